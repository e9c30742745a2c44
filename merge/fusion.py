"""The calibrated fusion score: a logistic model over the branches' features of a pair.

Fitted by ``calibration.fusion`` on copy pairs made from training photos (never on a test
set), stored as JSON (``merge.fusion_model``), applied deterministically. Its inputs are the
features ``merge.features.gather`` collects, in the order of ``merge.branches``; a model
fitted with other branches than the configured ones is refused with the command to refit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.logistic import LogisticModel
from merge.features import PairTable

FIT_HINT = "make calibrate-fusion (copydet calibrate-fusion --photos <training photos>)"


@dataclass
class FusionModel(LogisticModel):
    def score(self, table: PairTable) -> np.ndarray:
        """Probability of a copy for every pair of the table."""
        return self.probability(table.x)

    @classmethod
    def fit(cls, table: PairTable, labels: np.ndarray, trained_on: str = "",
            c: float = 1.0) -> FusionModel:
        return cls.fit_matrix(table.x, labels, table.features, trained_on, c)

    @classmethod
    def load(cls, path: str | Path, features: list[str]) -> FusionModel:  # type: ignore[override]
        return super().load(path, features, FIT_HINT)
