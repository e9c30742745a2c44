"""Find groups of look-alike training photos: different photos that the pipeline pairs today.

    copydet run --queries ../shared/trainset/photos --references ../shared/trainset/photos \\
        --work work/selftrain
    python -m data.mine_lookalikes --work work/selftrain --out work/lookalike_groups.csv

Every pair of two different photos of the run's submission scoring at least ``--min-score``
joins a group (connected components). Pairs that a person found to be the *same* photo (a
crop, a banner: a copy, not a look-alike) are listed in ``--same-photo`` and left out; the
shipped list is ``data/same_photo.csv``. A contact sheet of every pair kept
(``<out>.png``) is there to check by eye. The CSV (``group,photo``) feeds
``data.make_lookalike``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from common import cli
from common.images import list_images, read_image
from common.io import atomic_path, read_csv, write_csv

log = logging.getLogger(__name__)

SAME_PHOTO = Path(__file__).with_name("same_photo.csv")
THUMB = 160


def scored_pairs(work: Path, min_score: float) -> dict[tuple[str, str], float]:
    """Unordered pairs of different images of the run in ``work`` scoring ``min_score`` or
    more (the best of both directions)."""
    if not (work / "pipeline.json").is_file():
        raise FileNotFoundError(f"no finished run in {work} (no pipeline.json): run `copydet "
                                "run` there with the training photos as queries and references")
    record = json.loads((work / "pipeline.json").read_text())
    best: dict[tuple[str, str], float] = {}
    for row in read_csv(Path(record["submission"])):
        pair = tuple(sorted((row["query_id"], row["reference_id"])))
        if pair[0] != pair[1] and float(row["score"]) >= min_score:
            best[pair] = max(best.get(pair, 0.0), float(row["score"]))
    return best


def groups_of(pairs: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the pairs' graph, each sorted, in order of their first id."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    members: dict[str, list[str]] = {}
    for x in sorted(parent):
        members.setdefault(root(x), []).append(x)
    return sorted(members.values())


def contact_sheet(pairs: Sequence[tuple[str, str]], scores: Sequence[float], photos: Path,
                  out: Path, columns: int = 4) -> None:
    """The pairs side by side with their scores, ``columns`` pairs a row."""
    paths = {p.stem: p for p in list_images(photos).paths}
    unknown = sorted({i for pair in pairs for i in pair} - set(paths))
    if unknown:
        raise FileNotFoundError(f"{len(unknown)} paired image(s) not in {photos} (e.g. "
                                f"{unknown[0]}): give the --photos the run used")
    rows = (len(pairs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (2 * THUMB + 10), rows * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, ((a, b), score) in enumerate(zip(pairs, scores, strict=True)):
        y, x = divmod(k, columns)
        x, y = x * (2 * THUMB + 10), y * (THUMB + 14)
        for j, image_id in enumerate((a, b)):
            thumb = Image.fromarray(read_image(paths[image_id], "RGB")[0])
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, (x + j * THUMB, y))
        draw.text((x, y + THUMB), f"{a} {b} {score:.3f}", fill="black")
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def mine(work: str | Path, photos: str | Path, out: str | Path, min_score: float,
         same_photo: str | Path | None = SAME_PHOTO) -> Path:
    """Write the look-alike groups of the run in ``work`` to ``out``; return ``out``."""
    out = Path(out)
    scores = scored_pairs(Path(work), min_score)
    same = {tuple(sorted((r["photo_a"], r["photo_b"]))) for r in read_csv(Path(same_photo))
            } if same_photo else set()
    kept = sorted(p for p in scores if p not in same)
    groups = groups_of(kept)
    if kept:
        contact_sheet(kept, [scores[p] for p in kept], Path(photos), out.with_suffix(".png"))
    write_csv(out, ("group", "photo"), [(f"G{g:04d}", photo) for g, members in enumerate(groups)
                                        for photo in members])
    log.info("%d pairs of different photos scored >= %s (%d left out as the same photo): "
             "%d groups, %d photos -> %s", len(scores), min_score, len(scores) - len(kept),
             len(groups), sum(map(len, groups)), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="work folder of a run with the training photos as both sets")
    parser.add_argument("--photos", type=Path, default=Path("../shared/trainset/photos"))
    parser.add_argument("--out", type=Path, required=True, help="groups CSV to write")
    parser.add_argument("--min-score", type=float, default=0.5)
    parser.add_argument("--same-photo", type=Path, default=SAME_PHOTO,
                        help="CSV photo_a,photo_b: pairs found to be one photo, left out")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: mine(args.work, args.photos, args.out, args.min_score,
                                       args.same_photo))


if __name__ == "__main__":
    sys.exit(main())
