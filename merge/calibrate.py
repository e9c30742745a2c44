"""Fit the fusion model on copy pairs made from training photos (never a test set).

    copydet calibrate-fusion --photos ../shared/trainset/photos --work work

The photos are split by id (``data.split``); the ``calib`` part, which the global branch
never saw (its fine-tuning, whitening and normalisation bank use the ``fit`` part), becomes
a DISC21-style benchmark (``data.make_benchmark``). Every branch of ``merge.branches`` runs
on it exactly as on a real query set (``pipeline.run_branches``), ``merge.features.gather``
builds the same candidate table as ``merge.fuse`` does, and ``merge.fusion.FusionModel`` is
fitted on it: a pair is positive when the ground truth says the query was made from the
reference. The model is written to
``merge.fusion_model`` (shipped in the repository).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from common import cli
from common.config import REPO_ROOT
from common.images import list_images
from common.io import read_csv
from common.logs import start_run
from data.make_benchmark import QUERY_DIR, REF_DIR, make_benchmark
from data.split import split_photos
from merge.features import PairTable, gather
from merge.fusion import FusionModel

BENCHMARK = {"n_refs": 200, "n_positives": 200, "n_distractors": 150, "seed": 3}


def benchmark_root(work_dir: Path) -> Path:
    return work_dir / "calibration" / f"fusion-benchmark-{BENCHMARK['seed']}"


def benchmark_table(conf: dict[str, Any], photos: str | Path, work_dir: Path) -> PairTable:
    """Build the calibration benchmark, run every configured branch on it and gather the
    fusion's candidate table."""
    root = work_dir / "calibration"
    parts = split_photos(photos, root / "trainsplit")
    bench = benchmark_root(work_dir)
    if not (bench / "gt.csv").exists():
        make_benchmark(parts["calib"], bench, force=True, **BENCHMARK)
    outputs = pipeline.run_branches(conf, list_images(bench / QUERY_DIR),
                                    list_images(bench / REF_DIR), work_dir)
    branches = pipeline.selected(conf["merge"]["branches"])
    return gather(conf, branches, {n: o["pairs"] for n, o in outputs.items()}, root / "fusion")


def labels_of(table: PairTable, gt: Path) -> np.ndarray:
    positives = {(r["query_id"], r["reference_id"]) for r in read_csv(gt) if r["reference_id"]}
    return np.array([p in positives for p in table.pairs], int)


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the benchmark, gather the fusion features of its candidates, fit, write."""
    work_dir = Path(work_dir)
    table = benchmark_table(conf, photos, work_dir)
    run = start_run(work_dir, "merge.calibrate")
    with run:
        labels = labels_of(table, benchmark_root(work_dir) / "gt.csv")
        run.logger.info("fitting on %d candidate pairs (%d copies) with features %s",
                        len(labels), labels.sum(), table.features)
        model = FusionModel.fit(table, labels, trained_on=f"{photos} calib part {BENCHMARK}")
        out = Path(out) if out else REPO_ROOT / conf["merge"]["fusion_model"]
        model.save(out)
        run.logger.info("coefficients %s -> %s", model.weights(), out)
    return out


COMMAND = cli.Command(
    "calibrate-fusion", __doc__, lambda p: cli.add_fit_args(p, "merge.fusion_model"),
    lambda conf, a: main(conf, a.photos, a.work, a.out))

if __name__ == "__main__":
    cli.run_module("merge.calibrate")
