"""Synthetic training set of the overlay detector: photos pasted into other pictures, with the
box of the pasted copy as the YOLO label.

    python -m preprocess.synth --photos ../shared/trainset/photos --out work/overlay_synth

A sample takes a "copy" photo, sometimes edits it (crop, rotation, flip, colour, perspective...),
puts it somewhere — pasted at a random scale and place onto another photo, sometimes partly
outside it (``paste``), inside borders (``pad``), inside an app-like frame (``screenshot``),
under or over a caption band (``meme``), small (25-60 % of the side) with a frame and
overlays on top (``small_copy``: ``data.edits.small_copy_chain``, as real small copies
look) — and then edits the whole picture (text, emoji, colour, blur, JPEG, noise, stripes,
opacity, patches, scaling...). The label is the box of the pasted copy, computed exactly from
the edits' transforms (``data.edits``). ``negative`` samples are photos with the same kinds
of edits but nothing pasted: an empty label, so that the detector learns to stay silent.

Photos are split by photo into train / val / test: a test photo never appears in training, not
even as a background. Output, in the YOLO layout: ``images/<split>/<name>.jpg``,
``labels/<split>/<name>.txt`` (``0 xc yc w h`` normalised; empty: nothing pasted),
``data.yaml`` and ``samples.csv`` (split, name, kind, edits, box in pixels). Sample ``i`` of a
split has its own seed, so the set is reproducible bit for bit, and a larger split extends a
smaller one; samples are written in chunks whose record is written last, so a restarted run
redoes only unfinished chunks. A set made from other photos or with other settings
(``generator.txt``) is made again, and samples beyond the requested sizes are removed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from common import cli
from common.config import digest
from common.io import clean_stale_tmp, read_csv, write_csv, write_text
from common.logs import start_run
from common.parallel import parallel_map
from data.edits import (
    Edited,
    map_points,
    meme,
    onto_bg,
    pad,
    random_chain,
    screenshot,
    small_copy_chain,
    then,
)
from data.photos import load_photo, readable_photos, save_jpeg

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
KIND_WEIGHTS = {"paste": 0.25, "small_copy": 0.25, "pad": 0.08, "screenshot": 0.08, "meme": 0.06,
                "negative": 0.28}
PASTE_FRACTION = (0.2, 0.9)  # side of the pasted copy / side of the background
PASTE_OVERFLOW = 0.4  # at most this much of a copy's width and height outside the picture
PRE_EDITS = ("crop", "rotate", "hflip", "color", "gray", "aspect", "perspective", "blur")
POST_EDITS = ("text", "emoji", "color", "gray", "blur", "jpeg", "noise", "scale", "aspect",
              "sharpen", "pixelize", "stripes", "opacity")
NEGATIVE_EDITS = ("crop", "rotate", "rot90", "hflip", "vflip", "scale", "aspect", "perspective",
                  "color", "gray", "blur", "jpeg", "noise", "sharpen", "pixelize", "occlude",
                  "text", "emoji", "stripes", "opacity")
CHUNK = 64
SAMPLE_COLUMNS = ["split", "name", "kind", "edits", "x1", "y1", "x2", "y2"]


@dataclass
class Sample:
    """A training picture and the box ``(x1, y1, x2, y2)`` of its pasted copy (pixel edges)."""

    image: Image.Image
    kind: str
    edits: str
    box: tuple[float, float, float, float] | None


def copy_box(transform: np.ndarray, copy_size: tuple[int, int],
             out_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Box of a ``copy_size`` image mapped by ``transform``, in pixel edges, clipped to
    ``out_size``; None if less than 2 px of it is left."""
    w, h = copy_size
    corners = map_points(transform, [(-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, h - 0.5),
                                     (-0.5, h - 0.5)]) + 0.5
    x1, y1 = np.clip(corners.min(axis=0), 0, out_size)
    x2, y2 = np.clip(corners.max(axis=0), 0, out_size)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return float(x1), float(y1), float(x2), float(y2)


def place(kind: str, copy: Image.Image, rng: np.random.Generator,
          backgrounds: Sequence[Path]) -> Edited:
    """Put ``copy`` into a new picture the way ``kind`` says."""
    if kind == "paste":  # sometimes partly outside the picture
        overflow = PASTE_OVERFLOW if rng.random() < 0.3 else 0.0
        return onto_bg(copy, rng, backgrounds, frac_range=PASTE_FRACTION, overflow=overflow)
    if kind == "pad":  # once or twice: borders from thin to wide
        placed = pad(copy, rng)
        return then(placed, pad(placed.image, rng)) if rng.random() < 0.3 else placed
    if kind == "screenshot":
        return screenshot(copy, rng)
    if kind == "meme":
        return meme(copy, rng)
    if kind == "small_copy":
        return small_copy_chain(copy, rng, backgrounds)
    raise ValueError(f"unknown sample kind {kind!r}")


def make_sample(kind: str, photo: Image.Image, rng: np.random.Generator,
                backgrounds: Sequence[Path], max_side: int) -> Sample:
    """One training picture of ``kind`` made from ``photo`` (all randomness from ``rng``)."""
    if kind == "negative":
        edited = random_chain(photo, rng, (), (1, 3), NEGATIVE_EDITS, max_side)
        return Sample(edited.image, kind, edited.label, None)
    copy = photo
    labels = []
    if rng.random() < 0.5:
        pre = random_chain(photo, rng, (), (1, 2), PRE_EDITS, max_side)
        copy, labels = pre.image, [pre.label]
    placed = place(kind, copy, rng, backgrounds)
    post = random_chain(placed.image, rng, (), (0, 3), POST_EDITS, max_side)
    transform = post.transform @ placed.transform
    box = copy_box(transform, copy.size, post.image.size)
    label = "+".join(s for s in (*labels, placed.label, post.label) if s)
    return Sample(post.image, kind, label, box)


def yolo_label(box: tuple[float, float, float, float] | None, size: tuple[int, int]) -> str:
    """The YOLO label line of a box (class 0, normalised centre and size); "" for none."""
    if box is None:
        return ""
    (x1, y1, x2, y2), (w, h) = box, size
    return f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} " \
           f"{(y2 - y1) / h:.6f}\n"


@dataclass(frozen=True)
class Chunk:
    split: str
    start: int
    stop: int

    def record(self, out: Path) -> Path:
        """The chunk's ``samples.csv`` part, written last (named by its range, so that a set
        extended later redoes a chunk that grew)."""
        return out / "parts" / f"{self.split}_{self.start:06d}-{self.stop:06d}.csv"


def split_photos(photos: Sequence[Path], seed: int) -> dict[str, list[Path]]:
    """Disjoint train / val / test photo lists (a seeded permutation, cut by SPLIT_FRACTIONS)."""
    order = [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]
    cuts = np.cumsum([0, *(round(f * len(order)) for f in SPLIT_FRACTIONS)])
    cuts[-1] = len(order)
    return {s: order[cuts[k]:cuts[k + 1]] for k, s in enumerate(SPLITS)}


def write_chunk(chunk: Chunk, photos_by_split: dict[str, list[str]], out: Path, seed: int,
                max_side: int) -> int:
    """Make, write and record the samples of one chunk; return how many."""
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    photos = photos_by_split[chunk.split]
    rows = []
    for i in range(chunk.start, chunk.stop):
        rng = np.random.default_rng([seed, SPLITS.index(chunk.split), i])
        k = int(rng.integers(len(photos)))
        backgrounds = [Path(p) for j, p in enumerate(photos) if j != k]
        kind = str(rng.choice(kinds, p=weights / weights.sum()))
        sample = make_sample(kind, load_photo(Path(photos[k]), max_side), rng, backgrounds,
                             max_side)
        name = f"{chunk.split}_{i:06d}"
        save_jpeg(sample.image, out / "images" / chunk.split / f"{name}.jpg", 92)
        write_text(out / "labels" / chunk.split / f"{name}.txt",
                   yolo_label(sample.box, sample.image.size))
        box = [f"{v:.1f}" for v in sample.box] if sample.box else ["", "", "", ""]
        rows.append([chunk.split, name, sample.kind, sample.edits, *box])
    write_csv(chunk.record(out), SAMPLE_COLUMNS, rows)
    return len(rows)


def generator_digest(by_split: dict[str, list[Path]], seed: int, max_side: int) -> str:
    """What the samples are made from and how: photos, seed, size and the mix of kinds and
    edits (a set made otherwise is never resumed)."""
    return digest({s: [str(p.resolve()) for p in ps] for s, ps in by_split.items()}, seed,
                  max_side, KIND_WEIGHTS, PASTE_FRACTION, PASTE_OVERFLOW, PRE_EDITS, POST_EDITS,
                  NEGATIVE_EDITS)


def start_over_if_changed(out: Path, generator: str, log_to: logging.Logger) -> None:
    """Remove the samples of a set made with another generator (``generator.txt``), then
    record this one: chunks are resumed only when they were made the same way."""
    stamp = out / "generator.txt"
    if stamp.exists() and stamp.read_text().strip() != generator:
        log_to.warning("%s was made with other photos or settings: making it again", out)
        for folder in ("images", "labels", "parts"):
            shutil.rmtree(out / folder, ignore_errors=True)
    write_text(stamp, generator + "\n")


def drop_extra_samples(out: Path, names: set[str]) -> None:
    """Remove images and labels beyond this set's samples (left by a larger earlier set): the
    trainer reads whole folders."""
    for split in SPLITS:
        for folder, suffix in (("images", ".jpg"), ("labels", ".txt")):
            for path in (out / folder / split).glob(f"*{suffix}"):
                if path.stem not in names:
                    path.unlink()


def make_dataset(photos: str | Path, out: str | Path, sizes: dict[str, int], seed: int = 0,
                 max_side: int = 640, n_jobs: int = -1) -> Path:
    """Write the synthetic YOLO dataset described in the module docstring; return data.yaml."""
    out = Path(out)
    run = start_run(out, "preprocess.synth")
    with run:
        by_split = split_photos(readable_photos(photos), seed)
        start_over_if_changed(out, generator_digest(by_split, seed, max_side), run.logger)
        chunks = [Chunk(s, start, min(start + CHUNK, sizes[s]))
                  for s in SPLITS for start in range(0, sizes[s], CHUNK)]
        todo = [c for c in chunks if not c.record(out).exists()]
        for split in SPLITS:
            for folder in ("images", "labels"):
                (out / folder / split).mkdir(parents=True, exist_ok=True)
                clean_stale_tmp(out / folder / split)
        run.logger.info("photos %s; samples %s; %d of %d chunks to write -> %s",
                        {s: len(p) for s, p in by_split.items()}, sizes, len(todo),
                        len(chunks), out)
        work = functools.partial(write_chunk, out=out, seed=seed, max_side=max_side,
                                 photos_by_split={s: [str(p) for p in by_split[s]] for s in SPLITS})
        for _ in parallel_map(work, todo, n_jobs=n_jobs, desc="synthetic overlays", unit="img",
                              total=sum(c.stop - c.start for c in todo), weight=int):
            pass
        rows = [[r[k] for k in SAMPLE_COLUMNS] for c in chunks for r in read_csv(c.record(out))]
        drop_extra_samples(out, {r[1] for r in rows})
        write_csv(out / "samples.csv", SAMPLE_COLUMNS, rows)
        data = {"path": str(out.resolve()), **{s: f"images/{s}" for s in SPLITS},
                "names": {0: "copy"}}
        write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False))
        positives = sum(1 for r in rows if r[4])
        run.logger.info("%d samples, %d with a pasted copy, %d without", len(rows), positives,
                        len(rows) - positives)
    return out / "data.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of training photos")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    for split, default in zip(SPLITS, (2000, 200, 400), strict=True):
        parser.add_argument(f"--{split}", type=int, default=default,
                            help=f"samples in the {split} split (default {default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=640, help="long side of the samples")
    parser.add_argument("--n-jobs", type=int, default=-1, help="worker processes (-1: all)")
    args = parser.parse_args(argv)
    sizes = {s: getattr(args, s) for s in SPLITS}
    return cli.run_script(lambda: make_dataset(args.photos, args.out, sizes, args.seed,
                                               args.max_side, args.n_jobs))


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from preprocess import synth

    sys.exit(synth.main())
