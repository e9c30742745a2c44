"""Throughput of overlay detection on CPU, against a bare ultralytics predict loop.

    python -m bench.bench_detect --images ../shared/devset/queries [--limit 200] [--threads 1]

Three timings over the same images in the same run (wall-clock timings on a shared machine are
noisy: compare the ratios):

- ``bare``: ``YOLO.predict(path)`` one image at a time, ultralytics reading each file itself;
- ``detector``: our ``Detector`` (reduced-scale JPEG decoding, batches of ``preprocess.batch``);
- ``stage``: the whole ``preprocess.detect`` stage into a fresh work folder: detection plus box
  selection, crops cut from the full-resolution images, original files linked, shards, CSV.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.images import list_images
from preprocess import detect
from preprocess.yolo import load_model, set_threads


def bare_loop(paths: list[Path], conf: dict) -> int:
    """ultralytics' own predict, one file at a time; return the number of boxes."""
    model = load_model(conf["weights"])
    n = 0
    for path in paths:
        result = model.predict(str(path), imgsz=conf["imgsz"], conf=conf["min_conf"],
                               max_det=conf["max_det"], device="cpu", verbose=False)[0]
        n += len(result.boxes)
    return n


def detector_loop(paths: list[Path], conf: dict, threads: int) -> int:
    """Our detector over the same files, in batches; return the number of boxes."""
    detector = detect.Detector(conf, threads)
    n = 0
    for start in range(0, len(paths), 128):
        smalls = [detector.small(p) for p in paths[start:start + 128]]
        n += sum(len(b) for b in detector.detect([s for s, _ in smalls], [z for _, z in smalls]))
    return n


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=Path("data/queryimages"))
    parser.add_argument("--limit", type=int, default=200, help="images used (first N ids)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    conf = load_config(overrides=[f"run.n_jobs={args.threads}", "preprocess.device=cpu"])
    images = list_images(args.images)
    subset = type(images)(images.name, images.root, images.ids[:args.limit],
                          images.paths[:args.limit])
    paths = list(subset.paths)
    set_threads(args.threads)
    bare_loop(paths[:2], conf["preprocess"])  # warm-up: model load, first-call setup
    t_bare, n_bare = timed(bare_loop, paths, conf["preprocess"])
    t_det, n_det = timed(detector_loop, paths, conf["preprocess"], args.threads)
    with tempfile.TemporaryDirectory() as work:
        t_stage, _ = timed(detect.main, conf, subset, work)
    n = len(paths)
    print(f"{n} images from {args.images}, imgsz {conf['preprocess']['imgsz']}, "
          f"{args.threads} thread(s), CPU")
    for name, t, extra in (("bare ultralytics loop", t_bare, f"{n_bare} boxes"),
                           ("Detector (batched)", t_det, f"{n_det} boxes"),
                           ("detect stage (+crops)", t_stage, "")):
        print(f"{name:<24}{n / t:8.1f} img/s  {t:7.1f} s  x{t_bare / t:5.2f} vs bare  {extra}")


if __name__ == "__main__":
    main()
