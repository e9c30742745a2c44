"""The calibrated local score: a logistic model over verification features.

The model is fitted on copy pairs made from training photos (``match_score.calibrate``),
never on a test set, and stored as JSON next to the code. Its output is the probability that
a pair is a copy, a float comparable across queries; it does not tie in blocks the way raw
inlier counts do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common import UserError
from common.io import write_json

FEATURES = ("log_inliers", "inlier_ratio", "dense_agree", "dense_evidence", "log_matches")
DENSE_FULL = 64  # informative cells at which photometric evidence counts fully


def feature_matrix(rows: Sequence[Mapping[str, object]]) -> np.ndarray:
    """Model inputs from verification rows (dicts with ``geometry.FIELDS`` keys)."""
    def col(name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in rows], np.float64)

    inliers, matches = col("inliers"), col("matches")
    agree, cells = col("dense_agree"), col("dense_cells")
    return np.stack([
        np.log1p(inliers),
        inliers / np.maximum(matches, 1),
        agree,
        agree * np.minimum(cells, DENSE_FULL) / DENSE_FULL,
        np.log1p(matches),
    ], axis=1).reshape(len(rows), len(FEATURES))


@dataclass
class ScoreModel:
    """Standardised logistic regression: p = sigmoid(((x - mean) / scale) . coef + intercept)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    trained_on: str = ""

    def logit(self, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        x = (feature_matrix(rows) - np.array(self.mean)) / np.array(self.scale)
        return x @ np.array(self.coef) + self.intercept

    def predict(self, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Probability of a copy for each row; no evidence at all scores 0."""
        p = 1.0 / (1.0 + np.exp(-self.logit(rows)))
        no_match = np.array([float(r["inliers"]) == 0 for r in rows], bool)
        return np.where(no_match, 0.0, p)

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, object]], labels: np.ndarray,
            trained_on: str = "", c: float = 1.0) -> ScoreModel:
        from sklearn.linear_model import LogisticRegression

        x = feature_matrix(rows)
        mean, scale = x.mean(0), np.maximum(x.std(0), 1e-9)
        model = LogisticRegression(C=c, max_iter=1000, class_weight="balanced")
        model.fit((x - mean) / scale, labels)
        return cls(list(FEATURES), mean.tolist(), scale.tolist(), model.coef_[0].tolist(),
                   float(model.intercept_[0]), trained_on)

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> ScoreModel:
        path = Path(path)
        if not path.exists():
            raise UserError(f"score model {path} not found: fit one with "
                            "`python -m match_score.calibrate` (see README)")
        model = cls(**json.loads(path.read_text()))
        if tuple(model.features) != FEATURES:
            raise UserError(f"score model {path} uses features {model.features}, "
                            f"this code computes {list(FEATURES)}: recalibrate")
        return model
