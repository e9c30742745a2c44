"""Fit the local score model on copy pairs made from training photos (never a test set).

    copydet calibrate --photos ../shared/trainset/photos --work work

Builds two benchmarks from the photos: a DISC21-style one (``data.make_benchmark``:
references, edited copies, edited distractors) and a look-alike one from the ``fit`` part of
the photos (``data.make_lookalike``: other photos of a reference's setting, real ones from
``data/lookalike_groups.csv`` and made ones, as distractors). It runs the pipeline's local
branch on each up to its candidates, verifies them (unscored: no model is needed to fit a new
one), and fits ``match_score.score.ScoreModel`` on the verified pairs: a true pair's
best-verified view is a positive, every pair of a query with a reference it was not made from
is a negative. The model is written to ``match_score.score_model`` (shipped in the
repository).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from calibration import fit_command, save_fitted
from common import cli
from common.config import digest, file_digest
from common.images import list_images
from common.io import read_csv
from common.logs import start_run
from data.make_benchmark import QUERY_DIR, REF_DIR, built_once, make_benchmark
from data.make_lookalike import GROUPS, make_lookalike
from data.split import split_photos
from match_score import verify
from match_score.score import ScoreModel

MODEL_KEY = "match_score.score_model"  # the setting naming the shipped model
BENCHMARK = {"n_refs": 600, "n_positives": 450, "n_distractors": 450, "seed": 2021}
LOOKALIKE = {"n_made": 150, "n_refs": 200, "n_positives": 200, "n_distractors": 100, "seed": 12}


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


def benchmarks(photos: str | Path, work_dir: Path) -> list[Path]:
    """The two training benchmarks (built once): copies, and look-alikes of the fit part."""
    root = work_dir / "calibration"  # folders named after what they are made of
    return [
        built_once(root / f"benchmark-{digest(BENCHMARK)}",
                   lambda out: make_benchmark(photos, out, force=True, **BENCHMARK)),
        built_once(root / f"lookalike-{digest(LOOKALIKE, file_digest(GROUPS))}",
                   lambda out: make_lookalike(split_photos(photos, root / "trainsplit")["fit"],
                                              out, GROUPS, force=True, **LOOKALIKE)),
    ]


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the training benchmarks, verify their candidates and fit the score model."""
    work_dir = Path(work_dir)
    parts = [(run_local_branch(conf, bench, work_dir), bench) for bench in
             benchmarks(photos, work_dir)]
    run = start_run(work_dir, "calibration.score")
    with run:
        keep, labels = [], []
        for rows, bench in parts:
            gt = read_csv(bench / "gt.csv")
            positives = {(r["query_id"], r["reference_id"]) for r in gt if r["reference_id"]}
            rows, y = training_rows(rows, positives)
            keep += rows
            labels.append(y)
        labels = np.concatenate(labels)
        by_label = defaultdict(int, zip(*np.unique(labels, return_counts=True), strict=True))
        run.logger.info("fitting on %d pairs (%d copies, %d non-copies)", len(keep),
                        by_label[1], by_label[0])
        model = ScoreModel.fit(keep, labels, trained_on=f"{photos} {BENCHMARK} {LOOKALIKE}")
        out = save_fitted(model, out, conf, MODEL_KEY, run.logger)
    return out


COMMAND = fit_command("calibrate", __doc__, MODEL_KEY, main)

if __name__ == "__main__":
    cli.run_module("calibration.score")
