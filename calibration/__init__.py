"""Commands that run the pipeline to fit a model from training photos (never references).

``calibration.score`` fits the local score (``copydet calibrate``), ``calibration.fusion``
the fusion model (``copydet calibrate-fusion``). They sit above ``pipeline``: no stage
imports them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.config import REPO_ROOT
from common.logistic import LogisticModel


def save_fitted(model: LogisticModel, out: str | Path | None, conf: dict, key: str,
                logger: logging.Logger) -> Path:
    """Write a fitted model to ``out``, or where the setting ``key`` (``section.name``) says;
    log its coefficients; return the file."""
    section, name = key.split(".")
    out = Path(out) if out else REPO_ROOT / conf[section][name]
    model.save(out)
    logger.info("coefficients %s -> %s", model.weights(), out)
    return out
