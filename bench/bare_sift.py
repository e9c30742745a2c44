"""Baseline for the SIFT stage: a bare ``cv2.imread`` + resize + SIFT loop, one process.

    python -m bench.bare_sift DIR [--short-side 300] [--max-keypoints 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2


def bare_loop(paths: list[Path], short_side: int, max_keypoints: int,
              mirror: bool = False) -> int:
    """Read, downscale and describe every image (and its mirror image); return the number of
    keypoints."""
    cv2.setNumThreads(1)
    sift = cv2.SIFT_create(nfeatures=max_keypoints)
    total = 0
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            continue
        h, w = img.shape
        scale = short_side / min(h, w)
        if scale < 1:
            img = cv2.resize(img, (round(w * scale), round(h * scale)),
                             interpolation=cv2.INTER_AREA)
        for view in (img, cv2.flip(img, 1)) if mirror else (img,):
            keypoints, _ = sift.detectAndCompute(view, None)
            total += len(keypoints)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--short-side", type=int, default=300)
    parser.add_argument("--max-keypoints", type=int, default=1000)
    args = parser.parse_args()
    paths = sorted(p for p in args.folder.iterdir() if p.is_file())
    start = time.perf_counter()
    n = bare_loop(paths, args.short_side, args.max_keypoints)
    print(f"{len(paths)} images, {n} keypoints, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
