"""What a piece of work cost: wall time, CPU time and peak resident memory of this process and
all its worker processes (sampled in a background thread)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

SAMPLE_S = 0.5  # how often the process tree's memory is sampled (a sample: ~1 ms of CPU)


@dataclass
class Usage:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process, its live descendants and the children it has reaped."""
    total = sum(os.times()[2:4]) if proc.pid == os.getpid() else 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def measured(interval: float = SAMPLE_S) -> Iterator[Usage]:
    """Measure the block: the ``Usage`` yielded is filled in when it ends."""
    proc, usage, done = psutil.Process(), Usage(), threading.Event()
    peak = [tree_rss(proc)]

    def sample() -> None:
        while not done.wait(interval):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], tree_rss(proc))

    thread = threading.Thread(target=sample, daemon=True)
    start, cpu = time.perf_counter(), tree_cpu(proc)
    thread.start()
    try:
        yield usage
    finally:
        done.set()
        thread.join()
        usage.seconds = time.perf_counter() - start
        usage.cpu_seconds = max(0.0, tree_cpu(proc) - cpu)
        usage.peak_rss_mb = max(peak[0], tree_rss(proc)) / 2**20
