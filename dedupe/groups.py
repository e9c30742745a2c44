"""Groups of copies at an operating threshold, the image to keep in each, and the outputs.

Pairs scoring at least ``dedupe.threshold`` (a calibrated probability) are *links*.
Grouping (``dedupe.grouping``):

- ``star`` (default): groups around a centre. Images are taken in order of their summed
  link scores (most linked first); an image not yet grouped becomes a centre, and its linked
  images not yet grouped join it. Every member is linked to its centre, so a chain
  A~B~C with A≁C is one group only through a centre linked to both (B), and a chain of
  look-alikes never grows into a giant group.
- ``components``: connected components of the links (what the peer tools do), which merge
  every chain; kept to measure against (``bench.bench_dedupe``).

Keep rule, in each group: the most pixels, then the largest file (least compressed or
cropped), then the smallest id. Nothing in the user's folder is moved or deleted: the
outputs are lists.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import UserError
from common.io import read_csv, write_csv, write_text

GROUPINGS = ("star", "components")
PAIRS, GROUPS, DUPLICATES, KEEP, REMOVE = ("pairs.csv", "groups.csv", "duplicates.json",
                                           "keep.txt", "remove.txt")
PAIR_COLUMNS = ["image_a", "image_b", "score", "found_by"]


@dataclass(frozen=True)
class ImageInfo:
    """What the keep rule reads of an image: its pixels and its file size."""

    pixels: int
    bytes: int


def keep_order(image: str, info: Mapping[str, ImageInfo]) -> tuple:
    """Sort key of the keep rule (module docstring): the image to keep sorts first."""
    i = info.get(image, ImageInfo(0, 0))
    return (-i.pixels, -i.bytes, image)


def links(pairs: Iterable[tuple[str, str, float]], threshold: float) -> dict[str, dict[str, float]]:
    """Each image's linked images and the pair scores (pairs scoring ``threshold`` or more)."""
    linked: dict[str, dict[str, float]] = defaultdict(dict)
    for a, b, score in pairs:
        if score >= threshold and a != b:
            linked[a][b] = linked[b][a] = max(score, linked[a].get(b, 0.0))
    return linked


def star_groups(linked: Mapping[str, Mapping[str, float]],
                info: Mapping[str, ImageInfo]) -> list[list[str]]:
    """Groups around centres (module docstring)."""
    order = sorted(linked, key=lambda i: (-sum(linked[i].values()), keep_order(i, info)))
    grouped: set[str] = set()
    groups = []
    for centre in order:
        if centre in grouped:
            continue
        members = [centre, *sorted(n for n in linked[centre] if n not in grouped)]
        if len(members) > 1:
            grouped.update(members)
            groups.append(members)
    return groups


def component_groups(linked: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """Connected components of the links (scipy's)."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    images = sorted(linked)
    index = {image: i for i, image in enumerate(images)}
    edges = [(index[a], index[b]) for a in images for b in linked[a]]
    rows, cols = zip(*edges, strict=True) if edges else ((), ())
    graph = coo_array(([1] * len(edges), (rows, cols)), shape=(len(images), len(images)))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[str]] = defaultdict(list)
    for image, label in zip(images, labels, strict=True):
        groups[int(label)].append(image)
    return list(groups.values())


def make_groups(pairs: Iterable[tuple[str, str, float]], threshold: float,
                info: Mapping[str, ImageInfo], grouping: str = "star") -> list[list[str]]:
    """Groups of two or more images, each sorted by the keep rule (the kept image first);
    biggest groups first, then by their kept image."""
    if grouping not in GROUPINGS:
        raise UserError(f"dedupe.grouping must be one of {GROUPINGS}, not {grouping!r}")
    linked = links(pairs, threshold)
    found = star_groups(linked, info) if grouping == "star" else component_groups(linked)
    ordered = [sorted(g, key=lambda i: keep_order(i, info)) for g in found if len(g) > 1]
    return sorted(ordered, key=lambda g: (-len(g), g[0]))


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    """(image_a, image_b, score) of a ``pairs.csv``."""
    return [(r["image_a"], r["image_b"], float(r["score"])) for r in read_csv(path)]


def write_outputs(out: Path, images: Sequence[str], groups: Sequence[Sequence[str]]) -> None:
    """``groups.csv`` (``image,group,keep``; images in a group of two or more),
    ``duplicates.json`` (imagededup's ``{image: [duplicates]}``: every image, with the other
    members of its group), ``keep.txt`` (every image but the removed ones) and
    ``remove.txt`` (every member of a group but the kept one)."""
    rows, duplicates = [], {i: [] for i in images}
    for n, members in enumerate(groups, 1):
        name = f"G{n:05d}"
        rows += [(image, name, int(k == 0)) for k, image in enumerate(members)]
        for image in members:
            duplicates[image] = [m for m in members if m != image]
    removed = {image for members in groups for image in members[1:]}
    write_csv(out / GROUPS, ["image", "group", "keep"], rows)
    write_text(out / DUPLICATES, json.dumps(duplicates, indent=1, sort_keys=True) + "\n")
    write_text(out / KEEP, "".join(f"{i}\n" for i in images if i not in removed))
    write_text(out / REMOVE, "".join(f"{i}\n" for i in sorted(removed)))
