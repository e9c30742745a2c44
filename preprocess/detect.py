"""Stage: find the pasted copy in each query with the overlay detector and crop it.

    copydet detect --images data/queryimages --work work

Queries that are a small copy pasted onto another picture, a screenshot, a meme or a padded
frame are mostly surroundings; cropping the copy gives the branches a query that is mostly the
copy. The detector (``preprocess/assets``, trained on synthetic pastes by ``preprocess.train``)
runs on batches of queries downscaled to ``imgsz``. Each query keeps its best box that is not
almost the whole image (area <= ``max_area``), not too elongated (aspect within
``max_aspect``) and not tiny (``min_side`` px). The box is used for the global branch when its
confidence exceeds ``conf_global`` and for the local branch when it exceeds ``conf_local``.

Writes, under ``<work>/preprocess/<conf>/<set key>/``, and returns ``boxes.csv``:

- ``<set>-crop_global/`` and ``<set>-crop_local/``: the crops, named by query id (JPEG, cut
  from the full-resolution image, ``margin`` added on each side), of the queries whose box the
  branch uses; nothing of the other queries (never a copy or a link of an input);
- ``boxes.csv``: ``query_id,x1,y1,x2,y2,conf,used_for`` in full-resolution pixels, one row per
  decodable query (empty box: no box found; ``used_for`` ``global+local``, ``local`` or empty);
- resumable shards (``common.shards``) of the boxes, and ``skipped.csv`` of undecodable queries.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from common import cli
from common.config import file_digest, output_name
from common.devices import torch_devices
from common.images import (
    ImageError,
    ImageSet,
    input_images,
    list_images,
    read_image,
    resize_long_side,
)
from common.io import atomic_path, clean_stale_tmp, dump_joblib, read_csv, write_csv
from common.logs import RunLog, start_run
from common.parallel import resolve_n_jobs, thread_pool
from common.shards import ShardStore, ShardTask

STAGE = "preprocess"
BRANCHES = ("global", "local")
BOX_COLUMNS = ["query_id", "x1", "y1", "x2", "y2", "conf", "used_for"]
NOT_IN_NAME = ("batch", "device", "weights")  # the weights count by their content
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class Box:
    """A detection in full-resolution pixel edges (``0 <= x1 < x2 <= width``)."""

    x1: float
    y1: float
    x2: float
    y2: float
    conf: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


def select_box(boxes: list[Box], size: tuple[int, int], conf: dict[str, Any]) -> Box | None:
    """The most confident box that passes the shape tests, or None."""
    area = size[0] * size[1]
    for box in sorted(boxes, key=lambda b: -b.conf):
        if (box.conf >= conf["min_conf"]
                and box.width * box.height <= conf["max_area"] * area
                and min(box.width, box.height) >= conf["min_side"]
                and 1 / conf["max_aspect"] <= box.width / box.height <= conf["max_aspect"]):
            return box
    return None


def used_for(box: Box | None, conf: dict[str, Any]) -> list[str]:
    """The branches whose confidence threshold ``box`` passes (strictly, as the ISC solution)."""
    return [b for b in BRANCHES if box is not None and box.conf > conf[f"conf_{b}"]]


def crop_region(box: Box, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Integer pixel window of ``box`` grown by ``margin`` of its sides, inside the image."""
    mx, my = margin * box.width, margin * box.height
    return (max(0, math.floor(box.x1 - mx)), max(0, math.floor(box.y1 - my)),
            min(size[0], math.ceil(box.x2 + mx)), min(size[1], math.ceil(box.y2 + my)))


class Detector:
    """The overlay detector on batches of images (ultralytics YOLO, offline, CPU or GPUs).

    ``preprocess.device`` names its devices (``common.devices.torch_devices``: ``auto`` is
    every GPU torch sees, else the CPU); each device gets a model replica of its own and, with
    several, the batches go round-robin to them, one thread per device, results in order.
    The CPU gets one replica per thread of ``threads``, each running torch on one thread:
    this small network at 192 px barely spreads over cores (on 2 cores, one replica on two
    threads ran batches 1.15x as fast as on one thread; two replicas on one thread each,
    1.9x). It sets torch's thread count for the process (``set_threads``); the caller
    restores it.
    """

    def __init__(self, conf: dict[str, Any], threads: int = 1,
                 config_dir: str | Path | None = None):
        from preprocess.yolo import load_model, set_threads, ultralytics_offline

        ultralytics_offline(config_dir)
        self.conf = conf
        self.devices = torch_devices(conf["device"], "preprocess.device")
        if self.devices == ["cpu"]:
            self.devices = ["cpu"] * max(1, threads)
        cpu_replicas = self.devices.count("cpu")
        set_threads(max(1, threads // cpu_replicas) if cpu_replicas else threads)
        self.device = self.devices[0]
        self.model = load_model(conf["weights"])
        self.models = [self.model, *(load_model(conf["weights"]) for _ in self.devices[1:])]

    def small(self, path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        """The image as RGB with long side ``imgsz`` (reduced-scale JPEG decoding), and its
        full size."""
        rgb, size = read_image(path, "RGB", min_side=self.conf["imgsz"])
        return resize_long_side(rgb, self.conf["imgsz"]), size

    def find(self, paths: Sequence[str | Path]) -> list[tuple[list[Box], tuple[int, int]]
                                                        | ImageError]:
        """All boxes over ``min_conf`` of each image and its full size, in order (decoded on one
        thread per model replica); an unreadable image gives its ``ImageError``."""
        loaded = _each(self.small, paths, len(self.models))
        good = [x for x in loaded if not isinstance(x, ImageError)]
        found = iter(self.detect([image for image, _ in good], [size for _, size in good]))
        return [x if isinstance(x, ImageError) else (next(found), x[1]) for x in loaded]

    def _detect_batch(self, replica: int, images: list[np.ndarray],
                      sizes: list[tuple[int, int]]) -> list[list[Box]]:
        """Boxes of one batch of RGB images, by model replica ``replica`` on its device."""
        batch = [np.ascontiguousarray(im[..., ::-1]) for im in images]  # ultralytics wants BGR
        results = self.models[replica].predict(batch, imgsz=self.conf["imgsz"],
                                               conf=self.conf["min_conf"], iou=0.5,
                                               max_det=self.conf["max_det"],
                                               device=self.devices[replica], verbose=False)
        out: list[list[Box]] = []
        for im, size, result in zip(batch, sizes, results, strict=False):
            sx, sy = size[0] / im.shape[1], size[1] / im.shape[0]
            xyxy = result.boxes.xyxy.cpu().numpy().astype(np.float64) * [sx, sy, sx, sy]
            out.append([Box(*np.clip(b, 0, [*size, *size]).tolist(), float(c))
                        for b, c in zip(xyxy, result.boxes.conf.cpu().numpy(), strict=True)])
        return out

    def detect(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[list[Box]]:
        """All boxes over ``min_conf`` of each RGB image, scaled to its full ``size``."""
        step = self.conf["batch"]
        starts = range(0, len(images), step)
        if len(self.devices) == 1:
            return [boxes for s in starts
                    for boxes in self._detect_batch(0, images[s:s + step], sizes[s:s + step])]
        n = len(self.devices)

        def run_device(replica: int) -> list[list[list[Box]]]:
            return [self._detect_batch(replica, images[s:s + step], sizes[s:s + step])
                    for s in starts[replica::n]]

        with thread_pool(n, "detect") as pool:  # one per device
            per_device = list(pool.map(run_device, range(n)))
        out: list[list[Box]] = []
        for b in range(len(starts)):  # batch b ran on replica b % n, as its (b // n)-th
            out += per_device[b % n][b // n]
        return out


def output_root(conf: dict[str, Any], work_dir: str | Path) -> Path:
    """Folder of all query sets' detections made with this configuration and these weights."""
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    return Path(work_dir) / STAGE / output_name(section, file_digest(conf[STAGE]["weights"]))


def crop_folder(root: Path, branch: str) -> Path:
    """Crops of one branch, named after the query set so that feature stores stay distinct."""
    return root / f"{root.name}-crop_{branch}"


def crop_set(boxes: Path, branch: str) -> ImageSet:
    """The crops ``branch`` ("global" or "local") uses, from the ``boxes.csv`` that ``main``
    returned: the queries whose box passed ``conf_<branch>`` (the others' "crop" would be
    the whole query, which the branch has already described)."""
    folder = list_images(crop_folder(boxes.parent, branch), ids="relative_stem")
    used = {r["query_id"] for r in read_csv(boxes) if branch in r["used_for"].split("+")}
    keep = [(i, p) for i, p in zip(folder.ids, folder.paths, strict=True) if i in used]
    return replace(folder, ids=tuple(i for i, _ in keep), paths=tuple(p for _, p in keep))


def write_crops(root: Path, image_id: str, path: Path, box: Box | None,
                branches: list[str], margin: float, quality: int) -> None:
    """The crop of this query for each branch that uses its box (the other branches take the
    query itself, from its own folder: nothing of it is copied or linked here)."""
    if not branches:
        return
    rgb, size = read_image(path, "RGB")
    x1, y1, x2, y2 = crop_region(box, size, margin)
    crop = Image.fromarray(rgb[y1:y2, x1:x2])
    for branch in branches:
        with atomic_path(crop_folder(root, branch) / f"{image_id}.jpg") as tmp:
            crop.save(tmp, format="JPEG", quality=quality)


def _each(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R | ImageError]:
    """``fn`` of every item on ``threads`` threads (decoding and encoding release the GIL),
    in order; an item whose image cannot be read gives its ``ImageError``."""
    def safe(item: T) -> R | ImageError:
        try:
            return fn(item)
        except ImageError as err:
            return err

    if threads <= 1:
        return [safe(item) for item in items]
    with thread_pool(threads, "images") as pool:
        return list(pool.map(safe, items))


def detect_shard(task: ShardTask, detector: Detector, root: Path, run: RunLog) -> int:
    """Detect, crop and record one shard of queries; return the number of images."""
    conf, threads = detector.conf, len(detector.models)
    found = detector.find(task.paths)
    status = [str(x) if isinstance(x, ImageError) else "" for x in found]
    boxes = np.full((len(task.ids), 4), np.nan, np.float32)
    scores = np.zeros(len(task.ids), np.float32)
    crops = []  # (row, box) of every readable query
    for row, x in enumerate(found):
        if isinstance(x, ImageError):
            continue
        box = select_box(*x, conf)
        if box is not None:
            boxes[row], scores[row] = (box.x1, box.y1, box.x2, box.y2), box.conf
        crops.append((row, box))

    def crop(item: tuple[int, Box | None]) -> None:
        row, box = item
        write_crops(root, task.ids[row], Path(task.paths[row]), box, used_for(box, conf),
                    conf["margin"], conf["crop_quality"])

    for (row, _), error in zip(crops, _each(crop, crops, threads), strict=True):
        if error is not None:  # decodable at reduced scale, not in full
            status[row] = str(error)
    for image_id, path, reason in zip(task.ids, task.paths, status, strict=True):
        if reason:
            run.skip(image_id, path, reason)
    dump_joblib({"ids": list(task.ids), "status": status, "boxes": boxes, "conf": scores},
                task.out)
    return len(task.ids)


def box_rows(store: ShardStore, conf: dict[str, Any]) -> list[list]:
    """Rows of ``boxes.csv``: the queries that could be read (skipped ones are in the store's
    ``skipped.csv``)."""
    rows = []
    for k in range(len(store.shards)):
        shard = store.load(k)
        for image_id, status, box, score in zip(shard["ids"], shard["status"], shard["boxes"],
                                                shard["conf"], strict=True):
            if status or store.is_removed(image_id):
                continue
            if np.isnan(box).any():
                rows.append([image_id, "", "", "", "", "", ""])
            else:
                branches = used_for(Box(*box.tolist(), float(score)), conf)
                rows.append([image_id, *(f"{v:.1f}" for v in box), f"{score:.4f}",
                             "+".join(branches)])
    return rows


def main(conf: dict[str, Any], images: str | Path | ImageSet, work_dir: str | Path) -> Path:
    """Detect and crop the overlays of every query of ``images``; return ``boxes.csv``."""
    image_set = input_images(images)
    pconf = conf[STAGE]
    root = output_root(conf, work_dir) / image_set.key
    run = start_run(work_dir, f"{STAGE}.detect-{image_set.name}")
    with run:
        store = ShardStore.plan(root, image_set, conf["run"]["shard_size"])
        for branch in BRANCHES:
            crop_folder(root, branch).mkdir(parents=True, exist_ok=True)
            clean_stale_tmp(crop_folder(root, branch))
        tasks = store.tasks()
        if tasks:  # boxes.csv marks a complete detection: not until these shards are done
            (root / "boxes.csv").unlink(missing_ok=True)
        run.logger.info("%s: %d queries in %d shards, %d to detect, weights %s -> %s",
                        image_set.name, len(store), len(store.shards), len(tasks),
                        pconf["weights"], root)
        if tasks:
            import torch

            from preprocess.yolo import set_threads

            cv2.setNumThreads(1)
            threads = torch.get_num_threads()
            try:
                detector = Detector(pconf, resolve_n_jobs(conf["run"]["n_jobs"]),
                                    Path(work_dir) / "ultralytics")
                with tqdm(total=sum(len(t.ids) for t in tasks), unit="img", mininterval=0.5,
                          desc=f"detect {image_set.name}", dynamic_ncols=True) as bar:
                    for task in tasks:
                        bar.update(detect_shard(task, detector, root, run))
            finally:  # the later stages of this process get torch's threads back
                set_threads(threads)
        rows, skipped = box_rows(store, pconf), store.write_skipped()
        out = write_csv(root / "boxes.csv", BOX_COLUMNS, rows)
        n = {b: sum(b in r[6].split("+") for r in rows) for b in BRANCHES}
        run.logger.info("%d queries: %d cropped for the global branch, %d for the local "
                        "branch, %d skipped -> %s", len(rows), n["global"], n["local"],
                        skipped, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="folder of query images")


COMMAND = cli.Command("detect", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.images, a.work))

if __name__ == "__main__":
    cli.run_module("preprocess.detect")
