"""What the tasks of one stage share on a Dask worker (an index, a reference store): held by
a worker plugin for as long as the stage's ``shared_on_workers`` block lasts, then dropped.
A local run needs none of this: its stage holds such objects itself."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

R = TypeVar("R")


class WorkerResources(WorkerPlugin):
    """What a worker's tasks opened (``worker_resource``), shared by its threads."""

    def setup(self, worker: Any) -> None:
        self.items: dict[Hashable, Any] = {}
        self.lock = threading.Lock()

    def teardown(self, worker: Any) -> None:
        self.items.clear()


@contextlib.contextmanager
def shared_on_workers(client: Any) -> Iterator[str]:
    """Within the block, each worker of ``client`` keeps what its tasks open with
    ``worker_resource`` for its other tasks; after it, every worker drops them. Yields the
    name the tasks give ``worker_resource`` (one per block: runs sharing a cluster never
    share or drop each other's resources)."""
    name = f"copydet-resources-{uuid.uuid4().hex}"
    client.register_plugin(WorkerResources(), name=name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):  # a lost scheduler: its workers are gone too
            client.unregister_worker_plugin(name)


def worker_resource(name: str, key: Hashable, make: Callable[[], R]) -> R:
    """On a Dask worker inside the ``shared_on_workers`` block ``name``: the resource ``key``,
    made by ``make`` the first time one of the worker's tasks asks (once per worker; its
    threads wait)."""
    plugin = get_worker().plugins[name]
    with plugin.lock:
        if key not in plugin.items:
            plugin.items[key] = make()
        return plugin.items[key]
