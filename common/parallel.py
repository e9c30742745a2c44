"""The one execution layer every stage uses for its parallel work (joblib).

Tasks run on local worker processes (joblib's loky backend) by default, or on a Dask cluster
when a scheduler is named (``run.scheduler`` / ``--scheduler``): ``execution`` connects a
``dask.distributed.Client`` and switches joblib to its Dask backend, so the same stage code
runs on both. Each task is expected to write its own output atomically and return a small
summary, so results can be consumed in completion order and a killed run loses at most the
tasks in flight.

A cluster needs what a local run has: the same Python environment on every worker with this
repository importable (``PYTHONPATH``), and the image folders and work folder on a file
system every worker sees under the same absolute paths (tasks read and write files, never
ship arrays through the scheduler).

``stop_workers`` stops every local worker process (``common.cli`` calls it on every way a
command ends), so that none outlives its run holding files of the work folder open.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import joblib
from joblib import Parallel, delayed
from joblib.externals.loky import reusable_executor
from tqdm import tqdm

from common import UserError

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)
_CLIENT: contextvars.ContextVar[Any] = contextvars.ContextVar("dask_client", default=None)
CONNECT_TIMEOUT_S = 30


def resolve_n_jobs(n_jobs: int | None) -> int:
    """``None``, 0 or negative values count back from the number of usable cores (-1 = all)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if not n_jobs or n_jobs < 0:
        return max(1, cores + 1 + (n_jobs or -1))
    return n_jobs


def workers(n_jobs: int | None) -> int:
    """How many tasks the enclosing execution runs at once: the Dask cluster's threads, or
    ``n_jobs`` local processes."""
    client = dask_client()
    return sum(client.nthreads().values()) if client is not None else resolve_n_jobs(n_jobs)


def spread(items: Sequence[T], n: int) -> list[list[T]]:
    """``items`` in at most ``n`` consecutive, non-empty groups of near-equal size."""
    n = max(1, min(n, len(items)))
    edges = [round(i * len(items) / n) for i in range(n + 1)]
    return [list(items[a:b]) for a, b in itertools.pairwise(edges) if b > a]


def interrupts_end_workers() -> None:
    """A local worker's start: Ctrl-C reaches the whole process group, and a worker then ends
    at once and silently (Python's default raises ``KeyboardInterrupt`` wherever the worker
    is, loky's own loop included, and prints its traceback). The command sees its own Ctrl-C,
    or its worker's death by SIGINT, and ends in one line (``common.cli``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def limit_threads() -> None:
    """Keep OpenCV, Faiss and torch (when loaded) to one thread inside a worker, so workers do
    not oversubscribe."""
    import cv2

    cv2.setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover - faiss is a core dependency
        pass


def dask_client() -> Any:
    """The ``distributed.Client`` of the enclosing ``execution``, or None (local run)."""
    return _CLIENT.get()


def _worker_check() -> str:
    """Run on every Dask worker: can it import the pipeline, and from where?"""
    import common.config

    return str(common.config.REPO_ROOT)


def connect(scheduler: str, timeout: float | None = None) -> Any:
    """A client of ``scheduler``: an address (``tcp://host:8786``) or a scheduler JSON file.

    Checks that every worker can import this repository; a clear ``UserError`` otherwise.
    ``timeout`` defaults to Dask's ``distributed.comm.timeouts.connect`` setting.
    """
    from distributed import Client

    kwargs = {"timeout": timeout} if timeout is not None else {}
    try:
        if "://" not in scheduler and Path(scheduler).is_file():
            client = Client(scheduler_file=scheduler, **kwargs)
        else:
            client = Client(scheduler, **kwargs)
    except (OSError, TimeoutError, ValueError) as err:
        raise UserError(f"cannot connect to the Dask scheduler {scheduler}: {err}") from None
    try:
        roots = client.run(_worker_check)
    except Exception as err:  # a worker that cannot import the pipeline fails to unpickle
        client.close()
        raise UserError(
            f"Dask workers of {scheduler} cannot run the pipeline ({type(err).__name__}: "
            f"{err}): start them in the same environment with this repository on PYTHONPATH"
        ) from None
    if not roots:
        client.close()
        raise UserError(f"the Dask scheduler {scheduler} has no workers")
    log.info("Dask scheduler %s: %d worker(s), %d thread(s)", scheduler, len(roots),
             sum(client.nthreads().values()))
    return client


@contextlib.contextmanager
def execution(run_conf: Mapping[str, Any] | None = None, client: Any = None) -> Iterator[Any]:
    """Run the enclosed ``parallel_map`` calls on Dask when ``run_conf["scheduler"]`` names a
    scheduler (or ``client`` is given), else locally. Yields the client (or None)."""
    scheduler = (run_conf or {}).get("scheduler")
    if client is None and not scheduler:
        yield None
        return
    own = client is None
    client = client if client is not None else connect(str(scheduler))
    token = _CLIENT.set(client)
    try:
        with joblib.parallel_config(backend="dask", client=client,
                                   wait_for_workers_timeout=CONNECT_TIMEOUT_S):
            yield client
    finally:
        _CLIENT.reset(token)
        if own:
            client.close()


def parallel_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    *,
    n_jobs: int | None = -1,
    desc: str = "",
    unit: str = "task",
    total: int | None = None,
    weight: Callable[[R], int] | None = None,
) -> Iterator[R]:
    """Yield ``fn(task)`` for every task, in completion order, with a progress bar.

    ``weight`` maps a result to how many progress units it stands for (e.g. images in a
    shard); by default each task counts one. Inside ``execution`` with a scheduler, tasks run
    on the Dask cluster, on all its worker threads (``n_jobs`` is then ignored).
    """
    tasks = list(tasks)
    total = total if total is not None else len(tasks)
    on_dask = dask_client() is not None
    n_jobs = -1 if on_dask else min(resolve_n_jobs(n_jobs), max(1, len(tasks)))
    if on_dask and tasks:
        log.info("%s: %d task(s) on the Dask cluster %s", desc or "parallel_map", len(tasks),
                 dask_client().scheduler.address)
    if n_jobs == 1 or not tasks:
        results: Iterable[Any] = (fn(t) for t in tasks)
    else:
        local = {} if on_dask else {"initializer": interrupts_end_workers}
        results = Parallel(n_jobs=n_jobs, return_as="generator_unordered", **local)(
            delayed(fn)(t) for t in tasks)
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5) as bar:
        for result in results:
            bar.update(weight(result) if weight else 1)
            yield result


@contextlib.contextmanager
def thread_pool(threads: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose queued tasks are cancelled when the block ends (by an error, or
    Ctrl-C), so that only the tasks already running are waited for."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stop_workers(keep: Collection[Any] = (), timeout_s: float = 5.0) -> None:
    """Stop the worker processes this process started: joblib's reusable loky executor (its
    workers killed, not waited for: a task may be in the middle of a write) and the
    ``multiprocessing`` children not in ``keep`` (torch's DataLoader workers; ``keep``: those
    that were there before the command, e.g. a caller's Dask ``LocalCluster``). The resource
    trackers of loky and ``multiprocessing`` then end with this process (they hold no files;
    stopped earlier, they would be started again at exit to forget joblib's temporary
    folders). The next ``parallel_map`` starts new workers."""
    executor = reusable_executor._executor  # no public accessor that does not start one
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)
    for child in set(multiprocessing.active_children()) - set(keep):
        child.terminate()
        child.join(timeout_s)
