"""Build a deduplication benchmark: one folder of copy groups, look-alikes and singletons.

    python -m data.make_dedupe --photos work/moresplit/calib --out work/dedupe-bench

From photos nothing was fitted on (``more_photos``' ``calib`` part, ``make more-split``: the
pair verifier trains on the other part):

- copy groups: 2-6 images of one photo, each an edited copy (an edit kind of
  ``data.edits.EDITS`` drawn in turn, so every kind occurs, then 0-2 more random edits) or,
  in half of the groups, the photo itself as one member;
- look-alikes: the photos of ``data/more_photos_groups.csv`` (different photos of one
  setting: garments on one backdrop; ``--lookalikes``), each its own image, every other one
  with one edited copy beside it (a group of two next to its look-alikes);
- singletons: other photos, half of them edited once.

Layout of ``--out``: ``images/`` (``I%04d.jpg``, shuffled), ``groups.csv`` (``image,group,
role,edits`` for every image: images of one group are copies of one photo; ``role`` is
``copy``, ``original``, ``lookalike`` or ``singleton``; ``edits`` the chain label), written last:
a folder with it is whole. Photos left over serve as backgrounds of the edits.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common import cli
from common.io import read_csv, write_csv
from data.edits import EDITS, Edited, apply_edit, limit_size, map_points, random_chain, then
from data.photos import load_photo, readable_photos, save_jpeg

MORE_GROUPS = Path(__file__).with_name("more_photos_groups.csv")
IMAGES = "images"


def visible(edited: Edited, size: tuple[int, int], grid: int = 20) -> float:
    """The share of the photo (``size``: width, height) that stays inside the edited image:
    points of a grid over the photo mapped by the edit's transform."""
    xs, ys = np.meshgrid(np.linspace(0, size[0] - 1, grid), np.linspace(0, size[1] - 1, grid))
    mapped = map_points(edited.transform, np.c_[xs.ravel(), ys.ravel()])
    w, h = edited.image.size
    inside = (mapped[:, 0] >= 0) & (mapped[:, 0] < w) & (mapped[:, 1] >= 0) & (mapped[:, 1] < h)
    return float(inside.mean())


def edited_copy(photo: Image.Image, kind: str, rng: np.random.Generator,
                backgrounds: Sequence[Path], max_side: int, min_visible: float = 0.3) -> Edited:
    """``photo`` edited by ``kind`` then by 0-2 random edits, long side capped; drawn again
    until at least ``min_visible`` of the photo is in view (a crop after a paste can cut the
    pasted photo off: what is left is no copy)."""
    while True:
        first = apply_edit(kind, photo, rng, backgrounds)
        n_more = int(rng.integers(0, 3))
        edited = then(first, limit_size(first.image, max_side) if not n_more else
                      random_chain(first.image, rng, backgrounds, (n_more, n_more),
                                   max_side=max_side))
        if visible(edited, photo.size) >= min_visible:
            return edited


def make_dedupe(photos: str | Path, out: str | Path, n_groups: int = 60,
                n_singletons: int = 100, seed: int = 0, max_side: int = 800,
                force: bool = False, groups: str | Path = MORE_GROUPS) -> Path:
    """Build the benchmark of the module docstring in ``out``; return ``out``. ``groups``:
    the look-alike groups (``group,photo``) whose photos among ``photos`` are the
    look-alikes (``data/lookalike_groups.csv`` for the training photos)."""
    out = Path(out)
    if (out / "groups.csv").exists() or (out / IMAGES).exists():
        if not force:
            raise FileExistsError(f"{out} already holds a benchmark; use --force to overwrite")
        shutil.rmtree(out / IMAGES, ignore_errors=True)
        (out / "groups.csv").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    lookalike_ids = {r["photo"] for r in read_csv(Path(groups))}
    all_photos = readable_photos(photos)
    lookalikes = [p for p in all_photos if p.stem in lookalike_ids]
    others = [all_photos[i] for i in rng.permutation(len(all_photos))
              if all_photos[i].stem not in lookalike_ids]
    sources, singles = others[:n_groups], others[n_groups:n_groups + n_singletons]
    backgrounds = others[n_groups + n_singletons:]
    kinds = list(EDITS)
    items: list[tuple[str, str, Image.Image, str]] = []  # group, role, image, edits
    n_edit = 0

    def copy_of(photo: Image.Image) -> tuple[Image.Image, str]:
        nonlocal n_edit
        kind = kinds[n_edit % len(kinds)]
        n_edit += 1
        edited = edited_copy(photo, kind, rng, backgrounds, 1024)
        return edited.image, edited.label

    for g, path in enumerate(sources):
        photo = load_photo(path, max_side)
        size = int(rng.integers(2, 7))
        with_original = g % 2 == 0
        if with_original:
            items.append((f"C{g:03d}", "original", photo, ""))
        for _ in range(size - with_original):
            items.append((f"C{g:03d}", "copy", *copy_of(photo)))
    for k, path in enumerate(lookalikes):
        photo = load_photo(path, max_side)
        items.append((f"L{k:03d}", "lookalike", photo, ""))
        if k % 2 == 0:
            items.append((f"L{k:03d}", "copy", *copy_of(photo)))
    for k, path in enumerate(singles):
        photo = load_photo(path, max_side)
        if k % 2:
            edited = random_chain(photo, rng, backgrounds, (1, 1), max_side=1024)
            photo, label = edited.image, edited.label
        else:
            label = ""
        items.append((f"S{k:03d}", "singleton", photo, label))
    rows = []
    for n, i in enumerate(rng.permutation(len(items))):
        group, role, image, label = items[i]
        name = f"I{n:04d}.jpg"
        save_jpeg(image, out / IMAGES / name, 90)
        rows.append((name, group, role, label))
    write_csv(out / "groups.csv", ("image", "group", "role", "edits"), sorted(rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of source photos")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder to write")
    parser.add_argument("--groups", type=int, default=60, help="copy groups")
    parser.add_argument("--singletons", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookalikes", type=Path, default=MORE_GROUPS,
                        help="look-alike groups (group,photo) among the photos")
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: make_dedupe(args.photos, args.out, args.groups,
                                              args.singletons, args.seed, force=args.force,
                                              groups=args.lookalikes))


if __name__ == "__main__":
    sys.exit(main())
