"""Evaluation of copy-detection outputs: the ISC2021 / DISC21 matching-track metric.

The names below are loaded lazily, so that ``python -m evaluation.isc_metric`` does not import
the module twice (runpy would warn).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "MAX_PAIRS",
    "GroundTruth",
    "Metrics",
    "PRCurve",
    "Predictions",
    "evaluate",
    "load_ground_truth",
    "load_predictions",
    "plot_pr_curve",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("evaluation.isc_metric"), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
