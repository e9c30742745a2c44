"""The one execution layer every stage uses for its parallel work (joblib).

Tasks run on local worker processes (joblib's loky backend) by default. Each task is expected
to write its own output atomically and return a small summary, so results can be consumed in
completion order and a killed run loses at most the tasks in flight.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from joblib import Parallel, delayed
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def resolve_n_jobs(n_jobs: int | None) -> int:
    """``None``, 0 or negative values count back from the number of usable cores (-1 = all)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if not n_jobs or n_jobs < 0:
        return max(1, cores + 1 + (n_jobs or -1))
    return n_jobs


def limit_threads() -> None:
    """Keep OpenCV and Faiss to one thread inside a worker, so workers do not oversubscribe."""
    import cv2

    cv2.setNumThreads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover - faiss is a core dependency
        pass


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
    shard); by default each task counts one.
    """
    tasks = list(tasks)
    total = total if total is not None else len(tasks)
    n_jobs = min(resolve_n_jobs(n_jobs), max(1, len(tasks)))
    if n_jobs == 1:
        results: Iterable[Any] = (fn(t) for t in tasks)
    else:
        results = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(fn)(t) for t in tasks
        )
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5) as bar:
        for result in results:
            bar.update(weight(result) if weight else 1)
            yield result
