"""Fit the fusion model on copy pairs made from training photos (never a test set).

    copydet calibrate-fusion --photos ../shared/trainset/photos --work work

The photos are split by id (``data.split``); the ``calib`` part, which the global branch
never saw (its fine-tuning, whitening and normalisation bank use the ``fit`` part), becomes
two benchmarks: a DISC21-style one (``data.make_benchmark``) and one of made look-alikes
(``data.make_lookalike``: another view of a reference's background holding another object,
as distractors; the real look-alike groups are left to measure with). Every branch of
``merge.branches`` runs on each exactly as on a real query set (``pipeline.run_branches``),
``merge.features.gather`` builds the same candidate table as ``merge.fuse`` does, and
``merge.fusion.FusionModel`` is fitted on both tables: a pair is positive when the ground
truth says the query was made from the reference. The model is written to
``merge.fusion_model`` (shipped in the repository).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from calibration import fit_command, save_fitted
from common import cli
from common.config import digest
from common.images import list_images
from common.io import read_csv
from common.logs import start_run
from data.make_benchmark import QUERY_DIR, REF_DIR, built_once, make_benchmark
from data.make_lookalike import make_lookalike
from data.split import split_photos
from merge.branches import selected
from merge.features import PairTable, gather
from merge.fusion import FusionModel

MODEL_KEY = "merge.fusion_model"  # the setting naming the shipped model
BENCHMARK = {"n_refs": 200, "n_positives": 200, "n_distractors": 150, "seed": 3}
LOOKALIKE = {"groups": None, "n_made": 100, "n_refs": 100, "n_positives": 100,
             "n_distractors": 50, "seed": 4}


def benchmarks(photos: str | Path, work_dir: Path) -> list[Path]:
    """The calibration benchmarks of the ``calib`` photos (built once)."""
    root = work_dir / "calibration"
    calib = split_photos(photos, root / "trainsplit")["calib"]
    return [  # folders named after what they are made of
        built_once(root / f"fusion-benchmark-{digest(BENCHMARK)}",
                   lambda out: make_benchmark(calib, out, force=True, **BENCHMARK)),
        built_once(root / f"fusion-lookalike-{digest(LOOKALIKE)}",
                   lambda out: make_lookalike(calib, out, force=True, **LOOKALIKE)),
    ]


def benchmark_table(conf: dict[str, Any], bench: Path, work_dir: Path) -> PairTable:
    """Run every configured branch on a benchmark and gather the fusion's candidate table."""
    outputs = pipeline.run_branches(conf, list_images(bench / QUERY_DIR),
                                    list_images(bench / REF_DIR), work_dir)
    pair_files = {n: o["pairs"] for n, o in outputs.items()}
    return gather(conf, selected(conf["merge"]["branches"]), pair_files,
                  work_dir / "calibration" / "fusion" / bench.name)


def labels_of(table: PairTable, gt: Path) -> np.ndarray:
    positives = {(r["query_id"], r["reference_id"]) for r in read_csv(gt) if r["reference_id"]}
    return np.array([p in positives for p in table.pairs], int)


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the benchmarks, gather the fusion features of their candidates, fit, write."""
    work_dir = Path(work_dir)
    tables = [(benchmark_table(conf, bench, work_dir), bench)
              for bench in benchmarks(photos, work_dir)]
    run = start_run(work_dir, "calibration.fusion")
    with run:
        x = np.vstack([t.x for t, _ in tables])
        labels = np.concatenate([labels_of(t, bench / "gt.csv") for t, bench in tables])
        features = tables[0][0].features
        run.logger.info("fitting on %d candidate pairs (%d copies) with features %s",
                        len(labels), labels.sum(), features)
        model = FusionModel.fit_matrix(x, labels, features,
                                       f"{photos} calib part {BENCHMARK} {LOOKALIKE}")
        out = save_fitted(model, out, conf, MODEL_KEY, run.logger)
    return out


COMMAND = fit_command("calibrate-fusion", __doc__, MODEL_KEY, main)

if __name__ == "__main__":
    cli.run_module("calibration.fusion")
