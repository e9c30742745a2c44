"""Fit the fusion model on copy pairs made from training photos (never a test set).

    python -m merge.calibrate --photos ../shared/trainset/photos --work work

The photos are split by id (``data.split``); the ``calib`` part, which the global branch
never saw (its fine-tuning, whitening and normalisation bank use the ``fit`` part), becomes
a DISC21-style benchmark (``data.make_benchmark``). Every branch of ``merge.branches`` runs on
it exactly as on a real query set, ``merge.features.gather`` builds the same candidate table
as ``merge.fuse`` does, and ``merge.fusion.FusionModel`` is fitted on it: a pair is positive
when the ground truth says the query was made from the reference. The model is written to
``merge.fusion_model`` (shipped in the repository).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common import cli
from common.config import REPO_ROOT
from common.io import read_csv
from common.logs import start_run
from data.make_benchmark import QUERY_DIR, REF_DIR, make_benchmark
from data.split import split_photos
from merge.branches import Context, selected
from merge.features import PairTable, gather
from merge.fusion import FusionModel

BENCHMARK = {"n_refs": 200, "n_positives": 200, "n_distractors": 150, "seed": 3}
SET_NAMES = ("fusion-queries", "fusion-references")


def run_local(conf: dict[str, Any], bench: Path, work_dir: Path) -> None:
    from local_fea import extract, search
    from match_score import verify

    refs = extract.main(conf, bench / REF_DIR, work_dir, set_name=SET_NAMES[1])
    queries = extract.main(conf, bench / QUERY_DIR, work_dir, mirror=True,
                           set_name=SET_NAMES[0])
    search.main(conf, queries, refs, work_dir)
    verify.main(conf, queries, refs, work_dir)


def run_global(conf: dict[str, Any], bench: Path, work_dir: Path) -> None:
    from global_fea import extract, search

    h5 = extract.main(conf, bench / QUERY_DIR, bench / REF_DIR, work_dir, SET_NAMES)
    search.main(conf, h5, None, work_dir)


def run_crop_local(conf: dict[str, Any], bench: Path, work_dir: Path) -> None:
    from local_fea import extract
    from preprocess import crop_local, detect

    queries = stores_of(conf, work_dir)[0]
    refs = extract.main(conf, bench / REF_DIR, work_dir, set_name=SET_NAMES[1])  # resumable
    detect.main(conf, bench / QUERY_DIR, work_dir, set_name=SET_NAMES[0])
    crop_local.main(conf, queries, refs, work_dir)


RUNNERS = {"local": run_local, "global": run_global, "crop_local": run_crop_local}


def benchmark_root(work_dir: Path) -> Path:
    return work_dir / "calibration" / f"fusion-benchmark-{BENCHMARK['seed']}"


def benchmark_context(conf: dict[str, Any], photos: str | Path, work_dir: Path) -> Context:
    """Build the calibration benchmark and run every configured branch on it."""
    root = work_dir / "calibration"
    parts = split_photos(photos, root / "trainsplit")
    bench = benchmark_root(work_dir)
    if not (bench / "gt.csv").exists():
        make_benchmark(parts["calib"], bench, force=True, **BENCHMARK)
    for name in conf["merge"]["branches"]:
        if name not in RUNNERS:
            raise NotImplementedError(f"merge.calibrate does not know how to run {name!r}: "
                                      "add it to merge.calibrate.RUNNERS")
        RUNNERS[name](conf, bench, work_dir)
    return Context(conf, *stores_of(conf, work_dir), work_dir, root / "fusion")


def stores_of(conf: dict[str, Any], work_dir: Path) -> tuple[Path, Path]:
    """The benchmark's sets as the branches locate them (local feature stores)."""
    from local_fea.extract import features_root

    root = features_root(conf, work_dir)
    return root / SET_NAMES[0], root / SET_NAMES[1]


def labels_of(table: PairTable, gt: Path) -> np.ndarray:
    positives = {(r["query_id"], r["reference_id"]) for r in read_csv(gt) if r["reference_id"]}
    return np.array([p in positives for p in table.pairs], int)


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the benchmark, gather the fusion features of its candidates, fit, write."""
    work_dir = Path(work_dir)
    ctx = benchmark_context(conf, photos, work_dir)
    run = start_run(work_dir, "merge.calibrate")
    with run:
        table = gather(ctx, selected(conf["merge"]["branches"]))
        labels = labels_of(table, benchmark_root(work_dir) / "gt.csv")
        run.logger.info("fitting on %d candidate pairs (%d copies) with features %s",
                        len(labels), labels.sum(), table.features)
        model = FusionModel.fit(table, labels, trained_on=f"{photos} calib part {BENCHMARK}")
        out = Path(out) if out else REPO_ROOT / conf["merge"]["fusion_model"]
        model.save(out)
        run.logger.info("coefficients %s -> %s", model.weights(), out)
    return out


def run_cli(argv: list[str] | None = None) -> None:
    cli.run_fit_stage(main, __doc__, "merge.fusion_model", argv)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from merge import calibrate

    calibrate.run_cli()
