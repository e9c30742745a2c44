"""Fit the local score model on copy pairs made from training photos (never a test set).

    copydet calibrate --photos ../shared/trainset/photos --work work

Builds a DISC21-style benchmark from the photos (``data.make_benchmark``: references, edited
copies, edited distractors), runs the pipeline's local branch on it up to its candidates,
verifies them (unscored: no model is needed to fit a new one), and fits
``match_score.score.ScoreModel`` on the verified pairs: a true pair's best-verified view is a
positive, every pair of a query with a reference it was not made from is a negative. The
model is written to ``match_score.score_model`` (shipped in the repository).
"""

from __future__ import annotations

from collections import defaultdict
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
from match_score import verify
from match_score.score import ScoreModel

BENCHMARK = {"n_refs": 600, "n_positives": 450, "n_distractors": 450, "seed": 2021}


def training_rows(
    rows: list[dict[str, str]], positives: set[tuple[str, str]]
) -> tuple[list[dict[str, str]], np.ndarray]:
    """Rows with matches and their labels: only the best-verified view of a true pair is
    positive (the other view of a flipped copy carries no evidence)."""
    best: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        key = (row["query_id"], row["reference_id"])
        if key in positives and int(row["inliers_h1"]) > int(best.get(key, {}).get(
                "inliers_h1", -1)):
            best[key] = row
    keep = [r for r in rows if int(r["inliers"]) > 0 and (
        (r["query_id"], r["reference_id"]) not in positives
        or best[(r["query_id"], r["reference_id"])] is r)]
    labels = np.array([(r["query_id"], r["reference_id"]) in positives for r in keep], int)
    return keep, labels


def run_local_branch(conf: dict[str, Any], bench: Path, work_dir: Path) -> list[dict[str, str]]:
    """The verified rows (not scored: the model is what is being fitted) of the local branch's
    candidates on the benchmark, in candidate order."""
    out = pipeline.run_candidates(conf, list_images(bench / QUERY_DIR),
                                  list_images(bench / REF_DIR), work_dir, pipeline.Record())
    search_name = out["candidates"].parent.parent.name
    folder = verify.match_root(conf, search_name, work_dir) / "calibration"
    return verify.verify_pairs(conf, verify.candidate_pairs(out["candidates"]),
                               out["query_store"], out["reference_store"], folder / "parts")


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the training benchmark, verify its candidates and fit the score model."""
    work_dir = Path(work_dir)
    bench = work_dir / "calibration" / f"benchmark-{BENCHMARK['seed']}"
    if not (bench / "gt.csv").exists():
        make_benchmark(photos, bench, force=True, **BENCHMARK)
    rows = run_local_branch(conf, bench, work_dir)
    run = start_run(work_dir, "match_score.calibrate")
    with run:
        gt = read_csv(bench / "gt.csv")
        positives = {(r["query_id"], r["reference_id"]) for r in gt if r["reference_id"]}
        keep, labels = training_rows(rows, positives)
        by_label = defaultdict(int, zip(*np.unique(labels, return_counts=True), strict=True))
        run.logger.info("fitting on %d pairs (%d copies, %d non-copies)", len(keep),
                        by_label[1], by_label[0])
        model = ScoreModel.fit(keep, labels, trained_on=f"{photos} {BENCHMARK}")
        out = Path(out) if out else REPO_ROOT / conf["match_score"]["score_model"]
        model.save(out)
        run.logger.info("coefficients %s -> %s", model.weights(), out)
    return out


COMMAND = cli.Command(
    "calibrate", __doc__, lambda p: cli.add_fit_args(p, "match_score.score_model"),
    lambda conf, a: main(conf, a.photos, a.work, a.out))

if __name__ == "__main__":
    cli.run_module("match_score.calibrate")
