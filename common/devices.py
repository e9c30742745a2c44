"""Which accelerator a worker uses: one worker per visible GPU, the CPU when there is none.

A GPU stage starts ``gpu_n_jobs(...)`` workers (one per visible GPU) and each worker process
calls ``worker_device()`` once: it claims a distinct GPU for its lifetime by taking an
exclusive lock on that GPU's lock file, so two workers of one node never share a GPU while
another idles. Workers beyond the number of GPUs (or GPUs locked by another run) share them
round-robin. On a Dask cluster started with one worker per GPU (``dask-cuda``'s
``LocalCUDACluster``, or ``CUDA_VISIBLE_DEVICES`` set per worker) each worker sees one GPU
and takes it. Without GPUs everything answers "cpu" and the CPU path runs unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from common import UserError
from common.parallel import resolve_n_jobs

_HELD: dict[tuple[str, int], tuple[int, int]] = {}  # (lock dir, n) -> (slot, open lock fd)


def torch_gpus() -> int:
    """CUDA devices torch sees (``CUDA_VISIBLE_DEVICES`` applies); 0 without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def faiss_gpus() -> int:
    """GPUs faiss sees (always 0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def gpu_n_jobs(n_jobs: int | None, n_gpus: int) -> int:
    """Workers for a stage that can use GPUs: one per GPU, else the CPU worker count."""
    return n_gpus if n_gpus > 0 else resolve_n_jobs(n_jobs)


def _physical_ids(n: int) -> list[str]:
    """Node-wide names of the ``n`` visible GPUs (their ``CUDA_VISIBLE_DEVICES`` entries)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"copydet-gpu-locks-{os.getuid()}"


def claim_slot(n: int, lock_dir: str | Path | None = None,
               names: list[str] | None = None) -> int:
    """A slot in ``range(n)`` held by this process for its lifetime (same answer every call).

    Takes the first slot whose lock file (``lock_dir/slot-<name>.lock``) no other process
    holds; when all are held, shares one round-robin by process id.
    """
    if n < 1:
        raise ValueError("no slot to claim")
    lock_dir = Path(lock_dir or default_lock_dir())
    key = (str(lock_dir), n)
    if key in _HELD:
        return _HELD[key][0]
    names = names or [str(i) for i in range(n)]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot, name in enumerate(names):
        fd = os.open(lock_dir / f"slot-{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _HELD[key] = (slot, fd)  # the lock lasts as long as the process
        return slot
    slot = os.getpid() % n
    _HELD[key] = (slot, -1)
    return slot


def release_slots() -> None:
    """Give back the slots this process holds (they are also released when it exits)."""
    for _, fd in _HELD.values():
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


def worker_device(gpu: bool | str = "auto") -> str:
    """The torch device of this worker: ``cuda:<claimed GPU>``, or ``cpu`` without GPUs.

    ``gpu``: ``"auto"`` uses a GPU when torch sees one, ``False`` never, ``True`` requires one.
    """
    n = torch_gpus() if gpu else 0
    if gpu is True and n == 0:
        raise UserError("a GPU was required (gpu: true) but torch sees no CUDA device")
    if n == 0:
        return "cpu"
    return f"cuda:{claim_slot(n, names=_physical_ids(n))}"


def torch_device(name: str | int, key: str) -> str:
    """A stage's ``device`` setting (``key`` names it in errors) as a torch device: ``auto``
    claims a GPU of this node for this process (``worker_device``), else the CPU; an explicit
    ``cuda``/``cuda:N``/``N`` must exist."""
    if name == "auto":
        return worker_device("auto")
    name = f"cuda:{name}" if str(name).isdigit() else str(name)
    if name.startswith("cuda") and torch_gpus() == 0:
        raise UserError(f"{key}={name} but torch sees no GPU")
    return name
