"""Stage: RootSIFT features of an image folder, in resumable joblib shards.

    copydet extract --images data/referenceimages --work work
    copydet extract --images data/queryimages --work work --mirror

Writes ``<work>/local_fea/<conf name>/<set>-<path hash>-<role>/shard_*.pkl`` plus
``manifest.json`` and returns that store folder; a restarted run computes only the shards that
are missing. A set described as queries (``--mirror``: the mirror view too, with
``query_max_keypoints``) and as references (``max_keypoints``) gets two stores, so neither is
ever reused for the other.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

from common import cli
from common.config import output_name
from common.images import ImageError, ImageSet, input_images
from common.io import dump_joblib
from common.logs import RunLog, start_run
from common.parallel import limit_threads, parallel_map
from common.shards import ShardStore, ShardTask, pack
from local_fea.features import VIEWS, ImageFeatures, extract_image

STAGE = "local_fea"
QUERY_ONLY = ("query_max_keypoints",)  # in the query stores' names, not in the shared hash
NO_KEYPOINTS = "no keypoints (image too flat or too small)"


def features_root(conf: dict[str, Any], work_dir: str | Path) -> Path:
    """Folder of all image sets' features made with this configuration."""
    section = {k: v for k, v in conf[STAGE].items() if k not in QUERY_ONLY}
    return Path(work_dir) / STAGE / output_name(section)


def store_path(conf: dict[str, Any], image_set: ImageSet, work_dir: str | Path,
               mirror: bool) -> Path:
    """The feature store of ``image_set`` described as queries (``mirror``) or references."""
    role = f"query-k{conf[STAGE]['query_max_keypoints']}" if mirror else "ref"
    return features_root(conf, work_dir) / f"{image_set.key}-{role}"


def _empty() -> ImageFeatures:
    empty = (np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8))
    return ImageFeatures((0, 0), {v: empty for v in VIEWS}, np.zeros((0, 0), np.uint8))


def extract_shard(task: ShardTask, conf: dict[str, Any], mirror: bool) -> dict[str, Any]:
    """Compute and write one shard; return its summary (ids, keypoint counts, skips)."""
    limit_threads()
    views = VIEWS if mirror else VIEWS[:1]
    feats, status = [], []
    for path in task.paths:
        try:
            feats.append(extract_image(path, conf, mirror))
            status.append("")
        except ImageError as err:
            feats.append(_empty())
            status.append(str(err))
    payload = {
        "ids": list(task.ids),
        "status": status,
        "size": np.array([f.size for f in feats], np.int32).reshape(-1, 2),
        "views": {
            v: {"kpts": pack([f.views[v][0] for f in feats], np.float32, 4),
                "desc": pack([f.views[v][1] for f in feats], np.uint8, 128)}
            for v in views
        },
        "thumbs": pack([f.thumb.ravel() for f in feats], np.uint8),
        "thumb_shape": np.array([f.thumb.shape for f in feats], np.int32).reshape(-1, 2),
    }
    dump_joblib(payload, task.out)
    return {"index": task.index, "ids": task.ids, "paths": task.paths, "status": status,
            "n_kpts": [len(f.views["orig"][0]) for f in feats]}


def skip_reason(status: str, n_kpts: int) -> str:
    """Why an image gives no features: its decoding error, or no keypoints; empty if it does."""
    return status or ("" if n_kpts else NO_KEYPOINTS)


def shard_reasons(shard: dict[str, Any]) -> list[str]:
    """``skip_reason`` of every image of a stored shard (the store's ``skipped.csv``)."""
    n_kpts = np.diff(shard["views"]["orig"]["kpts"]["offsets"])
    return [skip_reason(s, int(n)) for s, n in zip(shard["status"], n_kpts, strict=True)]


def report_shard(summary: dict[str, Any], run: RunLog) -> None:
    """Log the skipped and keypoint-less images of a finished shard."""
    for image_id, path, status, n in zip(summary["ids"], summary["paths"], summary["status"],
                                         summary["n_kpts"], strict=True):
        if reason := skip_reason(status, n):
            run.skip(image_id, path, reason)


def main(conf: dict[str, Any], images: str | Path | ImageSet, work_dir: str | Path,
         mirror: bool = False) -> Path:
    """Extract features of every image of ``images``; return the store folder."""
    image_set = input_images(images)
    root = store_path(conf, image_set, work_dir, mirror)
    run = start_run(work_dir, f"{STAGE}.extract-{image_set.name}")
    with run:
        store = ShardStore.plan(root, image_set, conf["run"]["shard_size"])
        tasks = store.tasks()
        run.logger.info("%s: %d images in %d shards, %d to compute, %d removed from the "
                        "folder -> %s", image_set.name, len(store), len(store.shards),
                        len(tasks), len(store.removed), root)
        done = parallel_map(
            functools.partial(extract_shard, conf=conf[STAGE], mirror=mirror), tasks,
            n_jobs=conf["run"]["n_jobs"], desc=f"SIFT {image_set.name}", unit="img",
            total=sum(len(t.ids) for t in tasks), weight=lambda s: len(s["ids"]),
        )
        n_kpts = []
        for summary in done:
            report_shard(summary, run)
            n_kpts += summary["n_kpts"]
        if n_kpts:
            run.logger.info("%d images described, %.0f keypoints per image on average",
                            len(n_kpts), float(np.mean(n_kpts)))
        n_skipped = store.write_skipped(shard_reasons)
        run.logger.info("%s: %d of %d images skipped in all (%s)", image_set.name, n_skipped,
                        len(store), root / "skipped.csv")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--mirror", action="store_true",
                        help="describe as queries: also the mirror image (flipped copies), "
                        "with local_fea.query_max_keypoints")


COMMAND = cli.Command("extract", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.images, a.work, a.mirror))

if __name__ == "__main__":
    cli.run_module("local_fea.extract")
