"""Which accelerators a stage uses: every GPU of the node, or the CPU when there is none.

The torch stages (global descriptors, detection) run one model replica per device returned by
``torch_devices`` and spread their batches over them, so one run uses every GPU it sees;
``CUDA_VISIBLE_DEVICES`` decides which GPUs those are (a Dask-CUDA worker, or a run started
with ``CUDA_VISIBLE_DEVICES=2,3``, sees only its own). ``torch_device`` is the single-device
form (training). Exact k-NN picks its backend in ``common.knn`` from ``faiss_gpus`` and
``cuda_devices``. Without GPUs everything answers "cpu" and the CPU path runs unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from common import UserError

DeviceSetting = str | int | Sequence[str | int]


def _may_have_cuda() -> bool:
    """False when no NVIDIA device node exists and torch is not imported yet: then torch
    (seconds to import, hundreds of MB) is not imported just to learn that there is no GPU."""
    if "torch" in sys.modules:
        return True
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists()  # dxg: CUDA on WSL2


def torch_gpus() -> int:
    """CUDA devices torch sees (``CUDA_VISIBLE_DEVICES`` applies); 0 without torch or CUDA."""
    if not _may_have_cuda():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def faiss_gpus() -> int:
    """GPUs faiss sees (always 0 with faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def cuda_devices() -> list[str]:
    """Every CUDA device torch sees, as torch device names (``cuda:0`` … ``cuda:<n-1>``: the
    GPUs ``CUDA_VISIBLE_DEVICES`` lets this process see, renumbered by CUDA)."""
    return [f"cuda:{i}" for i in range(torch_gpus())]


def _one_device(name: str | int, key: str, visible: list[str]) -> str:
    name = str(name).strip()
    if name.isdigit():
        name = f"cuda:{name}"
    if name == "cpu":
        return name
    if name == "cuda":
        name = "cuda:0"
    if not name.startswith("cuda:") or not name[5:].isdigit():
        raise UserError(f"{key}={name!r}: expected auto, cpu, cuda, cuda:N or a list of them")
    if not visible:
        raise UserError(f"{key}={name} but torch sees no GPU")
    if name not in visible:
        raise UserError(f"{key}={name} but torch sees only {len(visible)} GPU(s): "
                        f"{', '.join(visible)}")
    return name


def torch_devices(setting: DeviceSetting, key: str) -> list[str]:
    """The torch devices a stage's ``device`` setting names (``key`` names it in errors).

    ``auto``: every CUDA device torch sees, else ``["cpu"]``; ``cuda``: every CUDA device (at
    least one required); ``cpu``; ``cuda:N`` or ``N``: that one; a list (or a comma-separated
    string) of these: those, in order (a device named twice gets two workers).
    """
    if isinstance(setting, str) and "," in setting:
        setting = [s for s in setting.split(",") if s.strip()]
    if not isinstance(setting, str | int):
        names = [d for s in setting for d in torch_devices(s, key)]
        if not names:
            raise UserError(f"{key} names no device")
        return names
    name = str(setting).strip()
    if name == "auto":
        return cuda_devices() or ["cpu"]
    if name == "cuda":
        visible = cuda_devices()
        if not visible:
            raise UserError(f"{key}=cuda but torch sees no GPU")
        return visible
    return [_one_device(name, key, cuda_devices() if name != "cpu" else [])]


def torch_device(name: DeviceSetting, key: str) -> str:
    """One torch device for a single-device user (``key`` names the setting in errors):
    ``auto`` is the first GPU torch sees, else the CPU; ``cuda``/``cuda:N``/``N`` must exist."""
    return torch_devices(name, key)[0]
