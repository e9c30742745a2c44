"""Run a command and measure its wall time and peak memory (RSS summed over its process tree)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil

from common.resources import tree_rss


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str


def measure(cmd: list[str], interval: float = 0.25, **kwargs) -> Measured:
    """Run ``cmd`` to completion, sampling the RSS of its process tree every ``interval`` s
    (a sample walks the process table: ~1 ms of CPU, which a faster rate takes from ``cmd``)."""
    start = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kwargs)
    proc, peak, done = psutil.Process(popen.pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], tree_rss(proc))
            except psutil.Error:
                return
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, _ = popen.communicate()
    done.set()
    thread.join()
    return Measured(time.perf_counter() - start, peak[0] / 2**20, popen.returncode, stdout)
