"""Each branch as the fusion sees it: its features, the values of a pair it has no evidence
for, the scale of its own scores, how its pairs file is read and how evidence is computed for
pairs it did not find. How a branch runs is the pipeline's business (``pipeline.BRANCHES``
pairs each of these with its stages); the fusion and its calibration only iterate over these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from common import UserError
from match_score.pair_net import MISSING as PAIR_MISSING
from merge.evidence import (
    GLOBAL_MISSING,
    LOGIT_FLOOR,
    Evidence,
    Pair,
    fill_global,
    fill_local,
    read_global,
    read_local,
)

PROBABILITY, SIMILARITY = "probability", "similarity"


@dataclass(frozen=True)
class BranchEvidence:
    """What the fusion needs of a branch (module docstring)."""

    name: str
    features: tuple[str, ...]  # fusion features of a pair, in this order
    missing: tuple[float, ...]  # the features of a pair the branch has no evidence for
    scale: str  # what its own scores are (merge.method=max compares only one scale)
    read: Callable[[dict[str, Any], Path], Evidence]
    fill: Callable[[dict[str, Any], Path, list[Pair], Path, str], Evidence] | None = None
    fill_all: bool = False  # fill every candidate (cheap), not only the top-ranked ones
    gap: bool = False  # also its first feature's gap to the best pair of the same query


BRANCHES = {branch.name: branch for branch in [
    BranchEvidence("local", ("local_logit", "pair_veto"), (LOGIT_FLOOR, PAIR_MISSING),
                   PROBABILITY, partial(read_local, with_pair=True),
                   partial(fill_local, with_pair=True), gap=True),
    BranchEvidence("global", ("global_sim", "global_norm"), GLOBAL_MISSING, SIMILARITY,
                   read_global, fill_global, fill_all=True),
    BranchEvidence("crop_local", ("crop_local_logit",), (LOGIT_FLOOR,), PROBABILITY,
                   read_local, fill_local),
    BranchEvidence("crop_global", ("crop_global_sim", "crop_global_norm"), GLOBAL_MISSING,
                   SIMILARITY, read_global, fill_global, fill_all=True),
]}


def selected(names: Sequence[str]) -> list[BranchEvidence]:
    """The declared branches of ``names`` (``merge.branches``), in that order."""
    unknown = [n for n in names if n not in BRANCHES]
    if unknown:
        raise UserError(f"merge.branches: unknown branch(es) {unknown} (known: "
                        f"{sorted(BRANCHES)})")
    return [BRANCHES[n] for n in names]
