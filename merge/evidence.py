"""What a branch's pairs file says about each (query, reference) pair, and how evidence is
computed for pairs the branch did not find (the fusion's fills).

- Local-like branches (``local``, ``crop_local``: ``match_score.verify``'s ``pairs.csv``): the
  logit of the calibrated local score of the pair's best view (``LOGIT_FLOOR`` without
  inliers). A fill verifies the pairs (both query views) with the feature stores named in
  the ``inputs.json`` beside the pairs file: the expensive fill.
- ``global`` (``global_fea.search``'s ``pairs.csv``): the raw and the normalised similarity.
  A fill is a dot product of the descriptors of the h5 named beside the pairs file: cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import REPO_ROOT, digest
from common.io import read_csv, read_inputs
from global_fea.search import GlobalScorer
from local_fea.features import LocalFeatures
from match_score.score import ScoreModel
from match_score.verify import verify_pairs

Pair = tuple[str, str]
LOGIT_FLOOR = -12.0  # local evidence of a pair without inliers, or never verified
GLOBAL_MISSING = (0.0, -0.2)  # a pair with an unreadable image: a poor global match


@dataclass
class Evidence:
    """One branch's features of the pairs it has evidence for, and its own score of them."""

    features: dict[Pair, np.ndarray] = field(default_factory=dict)
    scores: dict[Pair, float] = field(default_factory=dict)


def local_evidence(rows: list[dict[str, str]], conf: dict[str, Any]) -> Evidence:
    """The best verified view of each pair: its calibrated score and that score's logit
    (``LOGIT_FLOOR`` without inliers)."""
    model = ScoreModel.load(REPO_ROOT / conf["match_score"]["score_model"])
    evidence = Evidence()
    if not rows:
        return evidence
    logits = model.logit(rows)
    probs = model.predict(rows)
    for row, logit, prob in zip(rows, logits, probs, strict=True):
        pair = (row["query_id"], row["reference_id"])
        value = max(float(logit), LOGIT_FLOOR) if int(row["inliers"]) > 0 else LOGIT_FLOOR
        if pair not in evidence.scores or prob > evidence.scores[pair] or (
                prob == evidence.scores[pair] and value > evidence.features[pair][0]):
            evidence.scores[pair] = float(prob)
            evidence.features[pair] = np.array([value])
    return evidence


def read_local(conf: dict[str, Any], pairs_file: Path) -> Evidence:
    return local_evidence(read_csv(pairs_file), conf)


def fill_local(conf: dict[str, Any], pairs_file: Path, pairs: list[Pair], folder: Path,
               name: str) -> Evidence:
    """Verify ``pairs`` (every query view) with the feature stores that made ``pairs_file``;
    pairs of queries the query store does not hold (no crop) get no evidence."""
    stores = read_inputs(pairs_file)
    queries = LocalFeatures(stores["queries"])
    pairs = [p for p in pairs if p[0] in queries.store]
    if not pairs:
        return Evidence()
    todo = sorted((q, r, v, "") for q, r in pairs for v in queries.views())
    out = folder / f"{name}_fill-{digest(todo)}" / "parts"
    rows = verify_pairs(conf, todo, stores["queries"], stores["references"], out,
                        desc=f"verify ({name} fill)")
    return local_evidence(rows, conf)


def read_global(conf: dict[str, Any], pairs_file: Path) -> Evidence:
    evidence = Evidence()
    for row in read_csv(pairs_file):
        pair = (row["query_id"], row["reference_id"])
        evidence.features[pair] = np.array([float(row["similarity"]),
                                            float(row["norm_similarity"])])
        evidence.scores[pair] = float(row["score"])
    return evidence


def fill_global(conf: dict[str, Any], pairs_file: Path, pairs: list[Pair], folder: Path,
                name: str) -> Evidence:
    """Global similarities of ``pairs`` from the descriptors that made ``pairs_file``."""
    evidence = Evidence()
    if not pairs:
        return evidence
    sims, norms = GlobalScorer(conf, read_inputs(pairs_file)["h5"]).score(pairs)
    for pair, sim, norm in zip(pairs, sims, norms, strict=True):
        if np.isfinite(sim):
            evidence.features[pair] = np.array([float(sim), float(norm)])
            evidence.scores[pair] = float(norm)
    return evidence
