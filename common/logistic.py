"""The small calibrated models of the pipeline: standardised logistic regression in JSON.

A model is fitted on pairs made from training photos (never on a test set), stored as JSON
next to the code and applied deterministically: ``p = sigmoid(((x - mean) / scale) . coef +
intercept)``. Its output is a probability that a pair is a copy, a float comparable across
queries, without the tie blocks of raw counts. The local score (``match_score.score``) and
the fusion of branches (``merge.fusion``) are both such models over their own features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from common import UserError
from common.io import write_json

M = TypeVar("M", bound="LogisticModel")


@dataclass
class LogisticModel:
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    trained_on: str = ""

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The logit of each row of the feature matrix ``x`` (n, len(features))."""
        z = (np.asarray(x, np.float64) - np.array(self.mean)) / np.array(self.scale)
        return z @ np.array(self.coef) + self.intercept

    def probability(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(x)))

    @classmethod
    def fit_matrix(cls: type[M], x: np.ndarray, labels: np.ndarray, features: Sequence[str],
                   trained_on: str = "", c: float = 1.0, balanced: bool = True) -> M:
        """Fit on feature matrix ``x`` with 0/1 ``labels`` (classes weighted equally, or as
        they come when not ``balanced``: probabilities calibrated to the fitted set's mix)."""
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(x, np.float64)
        mean, scale = x.mean(0), np.maximum(x.std(0), 1e-9)
        model = LogisticRegression(C=c, max_iter=2000,
                                   class_weight="balanced" if balanced else None)
        model.fit((x - mean) / scale, labels)
        return cls(list(features), mean.tolist(), scale.tolist(), model.coef_[0].tolist(),
                   float(model.intercept_[0]), trained_on)

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls: type[M], path: str | Path, features: Sequence[str], fit_hint: str) -> M:
        """Read a model; a missing file or other features than ``features`` is a UserError
        that says how to fit one (``fit_hint``)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"model {path} not found: fit one with `{fit_hint}` (see README)")
        model = cls(**json.loads(path.read_text()))
        if list(model.features) != list(features):
            raise UserError(f"model {path} uses features {model.features}, this "
                            f"configuration computes {list(features)}: refit with `{fit_hint}`")
        return model

    def weights(self) -> dict[str, float]:
        """Coefficient of every (standardised) feature, for logs."""
        return {f: round(c, 3) for f, c in zip(self.features, self.coef, strict=True)}
