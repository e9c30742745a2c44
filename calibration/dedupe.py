"""Fit the fusion model of ``copydet dedupe`` on one folder made from training photos.

    copydet calibrate-dedupe --photos ../shared/trainset/photos --work work

In one folder deduplicated, a pair's gap to the best pair of its images (``local_logit_gap``)
says less than a query's gap to its best reference in ``run``: a photo with no copy still has
a best pair. So the fusion's features are weighed again on unordered pairs: the ``calib``
part of the training photos (``data.split``; the global branch never saw it) becomes a
deduplication benchmark (``data.make_dedupe``: copy groups of every edit kind, the real
look-alike groups of ``data/lookalike_groups.csv`` within it, singletons), ``copydet dedupe``
runs on it, and ``merge.fusion.FusionModel`` is fitted on the candidate table it wrote
(``pairs.features.csv``): a pair is positive when both images are copies of one photo.
Classes are weighted as they come (about one copy in ten candidate pairs), so the score is
a probability for a folder with that mix of copies and look-alikes. The model goes to
``dedupe.fusion_model``. Nothing of ``more_photos`` (the benchmark) is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration import fit_command, save_fitted
from common import cli
from common.config import digest, file_digest
from common.images import list_images
from common.io import read_csv
from common.logs import start_run
from data.make_dedupe import make_dedupe
from data.split import split_photos
from evaluation.dedupe import group_pairs, true_groups
from merge.fusion import FusionModel
from pipeline.dedupe import dedupe

MODEL_KEY = "dedupe.fusion_model"
LOOKALIKES = Path(__file__).resolve().parent.parent / "data" / "lookalike_groups.csv"
BENCHMARK = {"n_groups": 70, "n_singletons": 150, "seed": 5}


def benchmark(photos: str | Path, work_dir: Path) -> Path:
    """The deduplication benchmark of the ``calib`` photos (built once: named after it)."""
    root = work_dir / "calibration"
    calib = split_photos(photos, root / "trainsplit")["calib"]
    made_of = digest(BENCHMARK, sorted(list_images(calib).ids), file_digest(LOOKALIKES))
    out = root / f"dedupe-benchmark-{made_of}"
    if not (out / "groups.csv").exists():
        make_dedupe(calib, out, force=True, groups=LOOKALIKES, **BENCHMARK)
    return out


def main(conf: dict[str, Any], photos: str | Path, work_dir: str | Path,
         out: str | Path | None = None) -> Path:
    """Build the benchmark, deduplicate it, fit the fusion on its pairs, write the model."""
    work_dir = Path(work_dir)
    bench = benchmark(photos, work_dir)
    base = {**conf, "dedupe": {**conf["dedupe"], "fusion_model": conf["merge"]["fusion_model"]}}
    result = dedupe(base, bench / "images", work_dir)  # the features do not depend on a model
    rows = read_csv(result / "pairs.features.csv")
    truth = group_pairs(true_groups(bench / "groups.csv"))
    run = start_run(work_dir, "calibration.dedupe")
    with run:
        features = [c for c in rows[0] if c not in ("image_a", "image_b", "found_by", "score")]
        x = np.array([[float(r[c]) for c in features] for r in rows], np.float64)
        labels = np.array([(r["image_a"], r["image_b"]) in truth for r in rows], int)
        run.logger.info("fitting on %d unordered pairs (%d copies) with features %s",
                        len(labels), labels.sum(), features)
        model = FusionModel.fit_matrix(x, labels, features, f"{photos} calib part {BENCHMARK}",
                                       balanced=False)
        out = save_fitted(model, out, conf, MODEL_KEY, run.logger)
    return out


COMMAND = fit_command("calibrate-dedupe", __doc__, MODEL_KEY, main)

if __name__ == "__main__":
    cli.run_module("calibration.dedupe")
