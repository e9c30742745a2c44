"""Build a look-alike benchmark: references, their copies, and look-alikes of them.

    python -m data.make_lookalike --photos work/trainsplit/calib --out work/lookalike \\
        --made 60 --refs 150 --positives 150 --distractors 60 --seed 11

A *look-alike* of a photo is another photo of the same setting: the next garment on the same
hanger, the same cat in the same room. It shares much with the reference, yet it is not a copy.
Two kinds of groups:

- real: groups of different training photos of one setting (``--groups``, a CSV
  ``group,photo`` written by ``data.mine_lookalikes``; the shipped ``data/lookalike_groups.csv``
  by default); a group's photos outside ``--photos`` are left out;
- made: two overlapping windows of one background photo, each holding a different object
  photo (cut to the window's shape) at about the same place of the background, over 50-65 %
  of the window's area: more than the largest ``occlude`` edit (45 %) covers, so a made
  look-alike is never an occluded copy.

Every other group is a *query* group: its first photo is a reference with an edited copy
among the queries, the others are lightly edited queries with no copy (``lookalike_real`` /
``lookalike_made`` first in their ``edits.csv`` label). The others are *sibling* groups: every
photo is a reference with an edited copy among the queries (``sibling_real`` /
``sibling_made``), so a copy has its reference's look-alikes among the references too, as it
would in a large reference set.

``--refs`` more photos complete the reference set, with ``--positives`` copies among the
queries and ``--distractors`` edited photos that are not references, as in
``data.make_benchmark``, whose layout this is. ``gt.csv`` is written last.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from common import cli
from common.io import read_csv
from data.edits import Edited, random_chain
from data.make_benchmark import (
    Query,
    Source,
    clear_outputs,
    write_benchmark,
)
from data.photos import load_photo, readable_photos

log = logging.getLogger(__name__)

GROUPS = Path(__file__).with_name("lookalike_groups.csv")  # mined from the training photos
LIGHT_KINDS = ("crop", "scale", "color", "gray", "blur", "jpeg", "text", "hflip", "emoji")


def read_groups(path: str | Path, photos: Sequence[Path]) -> list[list[Path]]:
    """The groups of a ``group,photo`` CSV whose photos are among ``photos`` (by id, the
    file's stem), each with at least two of them."""
    by_name = {p.stem: p for p in photos}
    groups: dict[str, list[Path]] = defaultdict(list)
    rows = read_csv(Path(path))
    if rows and not {"group", "photo"} <= rows[0].keys():
        raise ValueError(f"{path}: a groups file has the columns group,photo, not "
                         f"{','.join(rows[0])}")
    for row in rows:
        if row["photo"] in by_name:
            groups[row["group"]].append(by_name[row["photo"]])
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) >= 2]


def _window(size: tuple[int, int], frac: float, rng: np.random.Generator) -> np.ndarray:
    """A random window (x0, y0, w, h) of ``frac`` of each side."""
    w, h = round(size[0] * frac), round(size[1] * frac)
    return np.array([rng.integers(0, size[0] - w + 1), rng.integers(0, size[1] - h + 1), w, h])


def _shifted(window: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``window`` moved by 3-10 % of its sides, kept inside ``size``."""
    moved = window.copy()
    for axis in (0, 1):
        step = round(rng.uniform(0.03, 0.1) * rng.choice([-1, 1]) * window[2 + axis])
        room = size[axis] - window[2 + axis]  # where the window's corner may go: 0..room
        if not 0 <= window[axis] + step <= room:
            step = -step  # no room that way: the other way
        moved[axis] = np.clip(window[axis] + step, 0, room)
    return moved


def _paste(view: Image.Image, obj: Image.Image, centre: np.ndarray, area: float) -> Image.Image:
    """``view`` with the middle of ``obj``, cut to the view's shape and resized to ``area`` of
    it, at ``centre`` (moved inside the view where it would stick out)."""
    aspect = view.width / view.height
    w, h = min(obj.width, round(obj.height * aspect)), min(obj.height, round(obj.width / aspect))
    obj = obj.crop(((obj.width - w) // 2, (obj.height - h) // 2,
                    (obj.width - w) // 2 + w, (obj.height - h) // 2 + h))
    side = np.sqrt(area)
    small = obj.resize((max(1, round(view.width * side)), max(1, round(view.height * side))),
                       Image.Resampling.LANCZOS)
    x = int(np.clip(round(centre[0] - small.width / 2), 0, view.width - small.width))
    y = int(np.clip(round(centre[1] - small.height / 2), 0, view.height - small.height))
    out = view.copy()
    out.paste(small, (x, y))
    return out


def made_pair(background: Image.Image, objects: tuple[Image.Image, Image.Image],
              rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """(reference, look-alike): two overlapping windows of ``background``, each with one of
    ``objects`` near the same background point, covering 50-65 % of the window."""
    first = _window(background.size, rng.uniform(0.7, 0.85), rng)
    second = _shifted(first, background.size, rng)
    spot = first[:2] + first[2:] * rng.uniform(0.4, 0.6, 2)  # background coordinates
    area = rng.uniform(0.5, 0.65)
    views = []
    for window, obj in zip((first, second), objects, strict=True):
        x0, y0, w, h = (int(v) for v in window)
        view = background.crop((x0, y0, x0 + w, y0 + h))
        jitter = rng.uniform(-0.03, 0.03, 2) * window[2:]
        views.append(_paste(view, obj, spot - window[:2] + jitter, area))
    return views[0], views[1]


def make_lookalike(photos: str | Path, out: str | Path, groups: str | Path | None, n_made: int,
                   n_refs: int, n_positives: int, n_distractors: int, seed: int,
                   max_side: int = 800, max_query_side: int = 1024,
                   force: bool = False, lookalike_edits: tuple[int, int] = (1, 2)) -> Path:
    """Build the look-alike benchmark of the module docstring in ``out``; return ``out``.
    A look-alike query gets ``lookalike_edits`` light edits ((0, 0): the photo as taken)."""
    out = Path(out)
    if n_positives and not n_refs:
        raise ValueError("positives need at least one reference")
    pool = readable_photos(photos)
    real = read_groups(groups, pool) if groups else []
    rng = np.random.default_rng(seed)
    taken = {p for g in real for p in g}
    rest = [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in taken]
    need = 3 * n_made + n_refs + n_distractors
    if need > len(rest):
        raise ValueError(f"need {need} photos besides the {len(taken)} of the look-alike "
                         f"groups, but only {len(rest)} are readable")
    made_photos, rest = rest[:3 * n_made], rest[3 * n_made:]
    fillers, distractor_sources, backgrounds = (
        rest[:n_refs], rest[n_refs:n_refs + n_distractors], rest[n_refs + n_distractors:])
    clear_outputs(out, force)
    references: list[Source] = []
    queries: list[Query] = []
    labels: list[tuple[str, bool]] = []  # per query: (look-alike label, lightly edited)

    def add(label: str, light: bool, ref: int | None, source: Source) -> None:
        queries.append((ref, source))
        labels.append((label, light))

    def add_group(kind: str, members: Sequence[Source], siblings: bool) -> None:
        for k, member in enumerate(members):
            if siblings or k == 0:
                add(f"sibling_{kind}" if siblings else "", False, len(references), member)
                references.append(member)
            else:
                add(f"lookalike_{kind}", True, None, member)

    for g, group in enumerate(real):
        add_group("real", group, siblings=g % 2 == 1)
    for i in range(n_made):
        bg, a, b = (load_photo(p, max_side) for p in made_photos[3 * i:3 * i + 3])
        add_group("made", made_pair(bg, (a, b), np.random.default_rng([seed, 1, i])),
                  siblings=i % 2 == 1)
    for i in rng.choice(n_refs, n_positives, replace=n_positives > n_refs) if n_refs else ():
        add("", False, len(references) + int(i), fillers[i])
    references += fillers
    for p in distractor_sources:
        add("", False, None, p)
    order = rng.permutation(len(queries))
    queries, labels = [queries[i] for i in order], [labels[i] for i in order]

    def image(source: Source) -> Image.Image:
        return source if isinstance(source, Image.Image) else load_photo(source, max_side)

    def edit(q: int, source: Source) -> Edited:
        label, light = labels[q]
        q_rng = np.random.default_rng([seed, 2, q])
        edited = (random_chain(image(source), q_rng, backgrounds, lookalike_edits, LIGHT_KINDS,
                               max_query_side) if light else
                  random_chain(image(source), q_rng, backgrounds, max_side=max_query_side))
        return replace(edited, label="+".join(filter(None, (label, edited.label))))

    write_benchmark(out, references, queries, image, edit, "look-alike set")
    log.info("wrote %d references and %d queries (%d real look-alike groups, %d made) to %s",
             len(references), len(queries), len(real), n_made, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of source photos")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder to write")
    parser.add_argument("--groups", type=Path, default=GROUPS,
                        help="CSV group,photo of real look-alikes (default: the shipped one)")
    parser.add_argument("--made", type=int, default=100, help="made look-alike pairs")
    parser.add_argument("--refs", type=int, default=150, help="more reference photos")
    parser.add_argument("--positives", type=int, default=150, help="copies of those")
    parser.add_argument("--distractors", type=int, default=50,
                        help="edited photos that are not references")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: make_lookalike(
        args.photos, args.out, args.groups, args.made, args.refs, args.positives,
        args.distractors, args.seed, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
