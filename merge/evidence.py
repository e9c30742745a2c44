"""What a branch's pairs file says about each (query, reference) pair, and how evidence is
computed for pairs the branch did not find (the fusion's fills).

- Local-like branches (``local``, ``crop_local``: ``match_score.verify``'s ``pairs.csv``): the
  logit of the calibrated local score of the pair's best view (``LOGIT_FLOOR`` without
  inliers off a frame) and, for ``local``, the pair verifier's veto on that view: its logit
  where it says "not a copy", else 0 (``match_score.pair_net``; ``pair_net.MISSING`` without
  a homography). How sure the verifier is of a copy adds nothing; how sure it is of a
  non-copy takes a look-alike's evidence back. A fill verifies the pairs (both query views)
  with the feature stores (and detector boxes) named in the ``inputs.json`` beside the pairs
  file: the expensive fill.
- ``global`` (``global_fea.search``'s ``pairs.csv``): the raw and the normalised similarity.
  A fill is a dot product of the descriptors of the h5 named beside the pairs file: cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError
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


def local_evidence(rows: list[dict[str, str]], conf: dict[str, Any],
                   with_pair: bool = False) -> Evidence:
    """The best verified view of each pair: its calibrated score and that score's logit
    (``LOGIT_FLOOR`` without inliers), and with ``with_pair`` the pair verifier's veto."""
    model = ScoreModel.load(REPO_ROOT / conf["match_score"]["score_model"])
    evidence = Evidence()
    if not rows:
        return evidence
    for row, logit, prob, inliers in zip(rows, *model.scored(rows), strict=True):
        pair = (row["query_id"], row["reference_id"])
        value = max(float(logit), LOGIT_FLOOR) if inliers > 0 else LOGIT_FLOOR
        if pair not in evidence.scores or prob > evidence.scores[pair] or (
                prob == evidence.scores[pair] and value > evidence.features[pair][0]):
            evidence.scores[pair] = float(prob)
            evidence.features[pair] = np.array(
                [value, *((pair_veto(row),) if with_pair else ())])
    return evidence


def pair_veto(row: dict[str, str]) -> float:
    """The pair verifier's logit of a verified row where it is below 0, else 0."""
    if "pair_logit" not in row:
        raise UserError("verified pairs without the pair verifier's logit (written by an older "
                        "version): verify them again (`copydet verify`, or `copydet run`)")
    return min(float(row["pair_logit"]), 0.0)


def read_local(conf: dict[str, Any], pairs_file: Path, with_pair: bool = False) -> Evidence:
    return local_evidence(read_csv(pairs_file), conf, with_pair)


def fill_local(conf: dict[str, Any], pairs_file: Path, pairs: list[Pair], folder: Path,
               name: str, with_pair: bool = False) -> Evidence:
    """Verify ``pairs`` (every query view) with the feature stores (and the detector boxes)
    that made ``pairs_file``; pairs of queries the query store does not hold (no crop) get no
    evidence."""
    stores = read_inputs(pairs_file)
    queries = LocalFeatures(stores["queries"])
    pairs = [p for p in pairs if p[0] in queries.store]
    if not pairs:
        return Evidence()
    todo = sorted((q, r, v, "") for q, r in pairs for v in queries.views())
    # named by the pairs file too: its path names every setting the pairs were verified with
    out = folder / f"{name}_fill-{digest(todo, str(Path(pairs_file).resolve()))}" / "parts"
    rows = verify_pairs(conf, todo, stores["queries"], stores["references"], out,
                        desc=f"verify ({name} fill)",
                        boxes=(stores.get("query_boxes"), stores.get("reference_boxes")))
    return local_evidence(rows, conf, with_pair)


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
