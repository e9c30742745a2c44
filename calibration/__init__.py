"""Commands that run the pipeline to fit a model from training photos (never references).

``calibration.score`` fits the local score (``copydet calibrate``), ``calibration.fusion``
the fusion model (``copydet calibrate-fusion``), ``calibration.dedupe`` the fusion of one
folder's pairs (``copydet calibrate-dedupe``), ``calibration.pair_net`` trains the pair
verifier (``copydet train-verifier``). They sit above ``pipeline``: no stage
imports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from common import cli
from common.config import REPO_ROOT
from common.logistic import LogisticModel


def fit_command(name: str, doc: str | None, key: str,
                main: Callable[[dict, Path, Path, Path | None], Path]) -> cli.Command:
    """The command of a calibration that fits the ``key`` model from ``--photos`` (``main(conf,
    photos, work, out)``) and writes it to ``--out``, or where the setting says."""
    return cli.Command(name, doc, lambda p: cli.add_fit_args(p, key),
                       lambda conf, a: main(conf, a.photos, a.work, a.out))


def save_fitted(model: LogisticModel, out: str | Path | None, conf: dict, key: str,
                logger: logging.Logger) -> Path:
    """Write a fitted model to ``out``, or where the setting ``key`` (``section.name``) says;
    log its coefficients; return the file."""
    section, name = key.split(".")
    out = Path(out) if out else REPO_ROOT / conf[section][name]
    model.save(out)
    logger.info("coefficients %s -> %s", model.weights(), out)
    return out
