"""The calibrated local score: a logistic model (``common.logistic``) over verification features.

The model is fitted on copy pairs made from training photos (``calibration.score``),
never on a test set, and stored as JSON next to the code. Its output is the probability that
a pair is a copy, a float comparable across queries; it does not tie in blocks the way raw
inlier counts do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError
from common.logistic import LogisticModel

FEATURES = ("log_inliers", "inlier_ratio", "dense_agree", "dense_evidence", "log_matches",
            "coverage")
DENSE_FULL = 64  # informative cells at which photometric evidence counts fully
MIN_EVIDENCE = 4  # inliers left off a frame that still say something (a homography's)
READ = ("inliers", "matches", "dense_agree", "dense_cells", "coverage")  # verification fields
FIT_HINT = "make calibrate (copydet calibrate --photos <training photos>)"


def feature_matrix(rows: Sequence[Mapping[str, object]],
                   inliers: np.ndarray | None = None) -> np.ndarray:
    """Model inputs from verification rows (dicts with ``geometry.FIELDS`` keys);
    ``inliers``: their ``evidence_inliers`` where already known."""
    missing = [f for f in READ if rows and f not in rows[0]]
    if missing:
        raise UserError(f"verified pairs without {missing} (written by an older version): "
                        "verify them again (`copydet verify`, or `copydet run`)")

    def col(name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in rows], np.float64)

    inliers = evidence_inliers(rows) if inliers is None else inliers
    matches = col("matches")
    agree, cells = col("dense_agree"), col("dense_cells")
    return np.stack([
        np.log1p(inliers),
        inliers / np.maximum(matches, 1),
        agree,
        agree * np.minimum(cells, DENSE_FULL) / DENSE_FULL,
        np.log1p(matches),
        col("coverage"),
    ], axis=1).reshape(len(rows), len(FEATURES))


def evidence_inliers(rows: Sequence[Mapping[str, object]]) -> np.ndarray:
    """Each verified row's inliers that are evidence: those not on a frame
    (``match_score.frames``), none where fewer than a homography's 4 are left."""
    inliers, frame = (np.array([float(r.get(k, 0)) for r in rows], np.float64)
                      for k in ("inliers", "frame_inliers"))  # no frame_inliers: none known
    left = inliers - frame
    return np.where((frame > 0) & (left < MIN_EVIDENCE), 0.0, left)


@dataclass
class ScoreModel(LogisticModel):
    """The local score: ``common.logistic.LogisticModel`` over ``FEATURES`` of verified rows."""

    def scored(self, rows: Sequence[Mapping[str, object]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's logit, probability of a copy (0 without evidence: no inlier off a
        frame) and ``evidence_inliers``, the rows read once."""
        inliers = evidence_inliers(rows)
        x = feature_matrix(rows, inliers)
        return self.decision(x), np.where(inliers == 0, 0.0, self.probability(x)), inliers

    def predict(self, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Probability of a copy for each row; no evidence (no inlier off a frame) scores 0."""
        return self.scored(rows)[1]

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, object]], labels: np.ndarray,
            trained_on: str = "", c: float = 1.0) -> ScoreModel:
        return cls.fit_matrix(feature_matrix(rows), labels, FEATURES, trained_on, c)

    @classmethod
    def load(cls, path: str | Path) -> ScoreModel:  # type: ignore[override]
        return super().load(path, FEATURES, FIT_HINT)
