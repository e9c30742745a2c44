"""Split a training photo folder into two disjoint parts, as folders of symbolic links.

    python -m data.split --photos ../shared/trainset/photos --out work/trainsplit

- ``fit/``: what models are fitted on: the global descriptor's fine-tuning, its whitening
  and the bank of training descriptors that scores are normalised against;
- ``calib/``: the photos the fusion is calibrated on (``calibration.fusion`` builds copy pairs
  from them). They must be unseen by the global branch, or calibration would see a copy's
  source photo among the query's nearest training photos and learn wrong weights.

A photo's part depends only on its id (a hash of the file stem), so the split is the same on
every machine and stable when photos are added. ``--hold-out`` puts every photo of the groups
of a ``group,photo`` CSV in ``calib/``: ``make more-split`` splits ``more_photos/`` so that the
pair verifier trains on its ``fit/`` part and the benchmarks of real look-alikes and frames
(``data.same_setting``, ``data.make_frames``) measure with whole groups it never saw.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Collection
from pathlib import Path

from common.images import list_images
from common.io import read_csv

PARTS = ("fit", "calib")


def part_of(image_id: str, calib_fraction: float) -> str:
    """``calib`` for about ``calib_fraction`` of the ids, ``fit`` for the others."""
    h = int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:8], "big") / 2.0**64
    return "calib" if h < calib_fraction else "fit"


def split_photos(photos: str | Path, out: str | Path, calib_fraction: float = 1 / 3,
                 held_out: Collection[str] = ()) -> dict[str, Path]:
    """Make ``out/fit`` and ``out/calib`` (links to the photos; the ids of ``held_out`` all in
    ``calib``); return both folders."""
    images, out = list_images(photos), Path(out)
    folders = {p: out / p for p in PARTS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for image_id, path in zip(images.ids, images.paths, strict=True):
        part = "calib" if image_id in held_out else part_of(image_id, calib_fraction)
        wanted[folders[part] / path.name] = path.resolve()
    for folder in folders.values():  # links of photos no longer there, or moved parts
        for link in folder.iterdir():
            if link not in wanted:
                link.unlink()
    for link, target in wanted.items():
        if not link.is_symlink() or Path(os.readlink(link)) != target:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", required=True, type=Path, help="training photos")
    parser.add_argument("--out", required=True, type=Path, help="folder for fit/ and calib/")
    parser.add_argument("--calib-fraction", type=float, default=1 / 3)
    parser.add_argument("--hold-out", type=Path, nargs="*", default=[],
                        help="CSVs group,photo: their photos all go to calib/")
    args = parser.parse_args(argv)
    held_out = {r["photo"] for csv in args.hold_out for r in read_csv(csv)}
    for part, folder in split_photos(args.photos, args.out, args.calib_fraction,
                                     held_out).items():
        print(f"{part}: {len(list(folder.iterdir()))} photos in {folder}")


if __name__ == "__main__":
    main()
