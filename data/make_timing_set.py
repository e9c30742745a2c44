"""Build a large timing set (default 8,000 references, 2,000 queries) from a few photo folders.

The speed benchmark needs more images than the photos we may use hold, so the pool is grown
with mildly edited variants (crop, colour, scale, aspect, flip, JPEG) of the source photos, and
a DISC21-style benchmark is drawn from that pool by ``data.make_benchmark``. The set built
for the figures in docs/results.md, from the project root::

    python -m data.make_timing_set --photos ../shared/trainset/photos \\
        ../shared/devset/references ../shared/devset/queries --out /tmp/timing10k

Variants of one photo are near-duplicates of each other, so a query may verify against several
references: for timing that is work a real catalogue also has. Its ``gt.csv`` names one
reference per copy, so it is for timing, not for measuring accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import cli
from common.config import digest
from common.io import clean_stale_tmp
from data.edits import random_chain
from data.make_benchmark import make_benchmark
from data.photos import load_photo, readable_photos, save_jpeg

log = logging.getLogger(__name__)

VARIANT_EDITS = ("crop", "color", "scale", "aspect", "hflip", "jpeg")


def grow_pool(folders: Sequence[Path], out: Path, size: int, seed: int,
              max_side: int = 800) -> Path:
    """Write ``size`` photos to a pool folder under ``out`` (named after what it is made of,
    so a rerun resumes it and other settings get their own): the sources first, then edited
    variants of them. Return the folder."""
    sources = [p for folder in folders for p in readable_photos(folder)]
    if not sources:
        raise ValueError(f"no readable photos in {', '.join(map(str, folders))}")
    pool = out / f"pool-{digest([str(p.resolve()) for p in sources], size, seed, max_side)}"
    pool.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(pool)
    for i in tqdm(range(size), desc="pool", unit="img"):
        target = pool / f"P{i:06d}.jpg"
        if target.exists():
            continue
        photo = load_photo(sources[i % len(sources)], max_side)
        if i >= len(sources):
            photo = random_chain(photo, np.random.default_rng([seed, i]), (), (1, 2),
                                 VARIANT_EDITS, max_side).image
        save_jpeg(photo, target, 95)
    return pool


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, nargs="+", required=True,
                        help="folders of source photos")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--refs", type=int, default=8000)
    parser.add_argument("--positives", type=int, default=1000)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--backgrounds", type=int, default=200,
                        help="pool photos left over for the pasting edits' backgrounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    def build() -> None:
        pool = grow_pool(args.photos, args.out, args.refs + args.distractors + args.backgrounds,
                         args.seed)
        make_benchmark(pool, args.out, args.refs, args.positives, args.distractors, args.seed,
                       force=args.force)

    return cli.run_script(build)


if __name__ == "__main__":
    sys.exit(main())
