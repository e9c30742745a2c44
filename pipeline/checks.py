"""What ``pipeline.run`` checks before any work, beyond the settings each stage checks itself:
the devices of the stages its branches run (a CUDA device that torch cannot see, or a search
set to ``gpu: true`` without a GPU, stops the run here, not after the branches before it),
and the free space of the work folder against a rough estimate of what the run writes (a
warning only: resumed runs write less, and the estimate is coarse). That the work folder can
be written in is checked when it is locked (``common.lock``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.devices import torch_devices
from common.images import ImageSet
from common.knn import select_backend

if TYPE_CHECKING:
    from pipeline import Branch

log = logging.getLogger(__name__)

# bytes a branch writes: per query, per reference, once (the demo set at the default
# settings, rounded up: local features and their index, descriptors and the ONNX network,
# detections and crops)
WRITES = {"local": (180e3, 130e3, 0.0), "global": (15e3, 8e3, 14e6),
          "crop_local": (60e3, 0.0, 0.0), "crop_global": (30e3, 0.0, 0.0)}


def check_devices(conf: dict[str, Any], sections: Iterable[str]) -> None:
    """Resolve the ``device`` of every section that has one, and check that a ``gpu`` other
    than auto or false (true needs a GPU; anything else is a typo) can be had (``UserError``
    if wrong)."""
    for section in sorted(set(sections)):
        if "device" in conf[section]:
            torch_devices(conf[section]["device"], f"{section}.device")
        if conf[section].get("gpu", "auto") not in ("auto", False):
            select_backend(conf[section], section)


def estimated_bytes(branches: list[str], queries: int, references: int) -> float:
    """About how many bytes a run of ``branches`` writes from scratch."""
    return sum(q * queries + r * references + once
               for q, r, once in (WRITES.get(b, (0.0, 0.0, 0.0)) for b in branches))


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_space(work: Path, need: float) -> None:
    """Warn when the work folder's file system has less free space than ``need`` bytes."""
    free = shutil.disk_usage(work).free
    if free < need:
        log.warning("the work folder %s has %s free and this run may write up to about %s: "
                    "if it stops on a full disk, free space or use another --work, then run "
                    "it again (finished work is kept)", work, gigabytes(free), gigabytes(need))


def before_work(conf: dict[str, Any], branches: Sequence[Branch], queries: ImageSet,
                references: ImageSet, work: Path) -> None:
    """The checks of a run that need its branches and image sets (module docstring)."""
    check_devices(conf, (s for b in branches for s in b.sections))
    check_space(work, estimated_bytes([b.name for b in branches], len(queries),
                                      len(references)))
