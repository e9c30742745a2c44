"""Build a DISC21-style copy-detection benchmark from a folder of photos.

The bundled demo set in ``data/`` was built, from the project root, with exactly::

    python -m data.make_benchmark --photos ../shared/cc0_photos --out data \\
        --refs 40 --positives 24 --distractors 12 --seed 0

Layout of ``--out``:

- ``referenceimages/R%06d.jpg``: reference photos (JPEG quality 95, long side <= ``--max-side``);
- ``queryimages/Q%05d.jpg``: positives (edited copies of references) and distractors (edited
  copies of photos that are not references), interleaved in a shuffled order;
- ``gt.csv``: ``query_id,reference_id`` sorted by query id, empty reference for a distractor;
- ``edits.csv``: ``query_id,edits`` with the ``data.edits`` chain label of every query;
- ``transforms.json``: query id -> 3x3 homography from the reference's pixel coordinates to the
  query's (positives only; pixel centres at integer coordinates, as in OpenCV).

Roles are drawn with the seed: references first, then distractor sources, and the photos left
over serve as ``onto_bg`` backgrounds and photo patches, so neither is ever a reference. Each
file is written atomically and ``gt.csv`` last, so a folder with ``gt.csv`` is complete.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import cli
from common.io import clean_stale_tmp, write_csv, write_json
from data.edits import Edited, random_chain, small_copy_chain
from data.photos import load_photo, readable_photos, save_jpeg

log = logging.getLogger(__name__)

REF_DIR, QUERY_DIR = "referenceimages", "queryimages"
CHAINS = ("random", "small_copy")  # random_chain, or data.edits.small_copy_chain
OUTPUTS = (REF_DIR, QUERY_DIR, "gt.csv", "edits.csv", "transforms.json")
Source = Any  # what a builder makes an image from: a photo's path, or an image it made
Query = tuple[int | None, Source]  # (number of the reference it copies, or None; source)


@dataclass(frozen=True)
class Roles:
    """Which source photo plays which part; the three groups never share a photo."""

    references: tuple[Path, ...]
    distractor_sources: tuple[Path, ...]
    backgrounds: tuple[Path, ...]


def assign_roles(photos: Sequence[Path], n_refs: int, n_distractors: int, seed: int) -> Roles:
    """Draw references, distractor sources and backgrounds (disjoint) from ``photos``."""
    if n_refs + n_distractors > len(photos):
        raise ValueError(
            f"need {n_refs} references + {n_distractors} distractor sources, "
            f"but only {len(photos)} readable photos"
        )
    order = [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]
    cut = n_refs + n_distractors
    return Roles(tuple(order[:n_refs]), tuple(order[n_refs:cut]), tuple(order[cut:]))


def clear_outputs(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing benchmark in ``out`` unless ``force``; then remove it."""
    found = [n for n in OUTPUTS if (out / n).is_file() or any((out / n).glob("*"))]
    if found and not force:
        raise FileExistsError(
            f"{out} already holds benchmark files ({', '.join(found)}); use --force to overwrite"
        )
    for name in found:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    if found:
        log.info("removed the previous benchmark in %s (--force)", out)


def write_benchmark(out: Path, references: Sequence[Source], queries: Sequence[Query],
                    load: Callable[[Source], Image.Image],
                    edit: Callable[[int, Source], Edited], desc: str,
                    ref_quality: int = 95, query_quality: int = 90) -> None:
    """Write ``references`` as ``R%06d.jpg`` and ``queries`` (reference number or None,
    source) edited by ``edit(q, source)`` as ``Q%05d.jpg``, then ``edits.csv``,
    ``transforms.json`` and, last, ``gt.csv`` (a folder with it is whole)."""
    for folder in (out / REF_DIR, out / QUERY_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(folder)
    gt, edits, transforms = [], [], {}
    with tqdm(total=len(references) + len(queries), desc=desc, unit="img") as bar:
        for i, source in enumerate(references):
            save_jpeg(load(source), out / REF_DIR / f"R{i:06d}.jpg", ref_quality)
            bar.update()
        for q, (ref, source) in enumerate(queries):
            qid, edited = f"Q{q:05d}", edit(q, source)
            save_jpeg(edited.image, out / QUERY_DIR / f"{qid}.jpg", query_quality)
            gt.append((qid, "" if ref is None else f"R{ref:06d}"))
            edits.append((qid, edited.label))
            if ref is not None:
                transforms[qid] = [[round(float(v), 9) for v in row] for row in edited.transform]
            bar.update()
    write_csv(out / "edits.csv", ("query_id", "edits"), edits)
    write_json(out / "transforms.json", transforms)
    write_csv(out / "gt.csv", ("query_id", "reference_id"), gt)


def built_once(folder: Path, build: Callable[[Path], Any]) -> Path:
    """``folder``, made by ``build(folder)`` unless it already holds a whole benchmark (its
    ``gt.csv``, written last). Name it after what it is made of: it is never rebuilt."""
    if not (folder / "gt.csv").exists():
        build(folder)
    return folder


def make_benchmark(
    photos: str | Path,
    out: str | Path,
    n_refs: int,
    n_positives: int,
    n_distractors: int,
    seed: int,
    max_side: int = 800,
    max_query_side: int = 1024,
    ref_quality: int = 95,
    query_quality: int = 90,
    n_edits: tuple[int, int] = (1, 3),
    kinds: Iterable[str] | None = None,
    force: bool = False,
    chain: str = "random",
) -> Path:
    """Build the benchmark described in the module docstring in ``out``; return ``out``.
    ``chain``: how queries are edited (``CHAINS``); ``n_edits`` and ``kinds`` are
    ``random_chain``'s."""
    out = Path(out)
    if chain not in CHAINS:
        raise ValueError(f"unknown chain {chain!r} (known: {', '.join(CHAINS)})")
    if n_positives and not n_refs:
        raise ValueError("positives need at least one reference")
    clear_outputs(out, force)
    roles = assign_roles(readable_photos(photos), n_refs, n_distractors, seed)
    log.info("%d references, %d distractor sources, %d background photos",
             len(roles.references), len(roles.distractor_sources), len(roles.backgrounds))
    rng = np.random.default_rng(seed)
    positives = rng.choice(n_refs, n_positives, replace=n_positives > n_refs) if n_refs else ()
    jobs = [(int(i), roles.references[i]) for i in positives]
    jobs += [(None, p) for p in roles.distractor_sources]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]
    kinds = None if kinds is None else tuple(kinds)

    def edit(q: int, path: Path) -> Edited:
        photo, q_rng = load_photo(path, max_side), np.random.default_rng([seed, q])
        if chain == "small_copy":
            return small_copy_chain(photo, q_rng, roles.backgrounds, max_query_side)
        return random_chain(photo, q_rng, roles.backgrounds, n_edits, kinds, max_query_side)

    write_benchmark(out, roles.references, jobs, lambda path: load_photo(path, max_side), edit,
                    "benchmark", ref_quality, query_quality)
    log.info("wrote %d references and %d queries (%d positives, %d distractors) to %s",
             n_refs, len(jobs), n_positives, n_distractors, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of source photos")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder to write")
    parser.add_argument("--refs", type=int, required=True, help="number of reference images")
    parser.add_argument("--positives", type=int, required=True, help="edited reference copies")
    parser.add_argument("--distractors", type=int, required=True,
                        help="edited copies of non-reference photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=800, help="cap on reference long side")
    parser.add_argument("--max-query-side", type=int, default=1024)
    parser.add_argument("--ref-quality", type=int, default=95)
    parser.add_argument("--query-quality", type=int, default=90)
    parser.add_argument("--chain", choices=CHAINS, default="random",
                        help="query edits: random chains, or small pasted copies with overlays")
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: make_benchmark(
        args.photos, args.out, args.refs, args.positives, args.distractors, args.seed,
        max_side=args.max_side, max_query_side=args.max_query_side,
        ref_quality=args.ref_quality, query_quality=args.query_quality, force=args.force,
        chain=args.chain))


if __name__ == "__main__":
    sys.exit(main())
