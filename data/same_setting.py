"""Build the same-setting benchmark: real photos of one setting, whole groups held out.

    python -m data.same_setting --photos ../shared/trainset/photos \\
        ../shared/trainset/more_photos --fitted ../shared/trainset/photos --out work/samesetting

The groups are different training photos of one setting (garments on one floor, bed or
hanger; one animal in one room): ``data/lookalike_groups.csv``, mined from ``photos/`` by
``make lookalike-groups``, and ``data/more_photos_groups.csv``, garments on one backdrop among
``more_photos/``, checked by eye (found on contact sheets of the pipeline's pairs of
``more_photos/`` against itself and of every photo larger than its 224-px scenes).

Each group is fitted on or only measured *as a whole*. The shipped calibrations drew their
references, copies, distractors and look-alikes from the whole ``--fitted`` folder, so a
group with any photo there is ``fit`` (``group_parts``); the others are ``measure``. The
benchmark (``data.make_lookalike``'s layout, no made look-alikes) holds the ``measure``
groups and fillers (more references, their copies, distractors) from the photos in no group
outside ``--fitted``: nothing in it was fitted on. Its look-alike queries are the photos as
taken (another photo of a setting is not an edit of it); copies are edited as in
``data.make_benchmark``. ``<out>/photos/`` links the photos it was drawn from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from common import cli
from common.images import list_images
from common.io import read_csv, write_csv
from data.make_benchmark import clear_outputs
from data.make_lookalike import GROUPS, make_lookalike

log = logging.getLogger(__name__)

MORE_GROUPS = Path(__file__).with_name("more_photos_groups.csv")


def group_parts(groups: dict[str, list[str]], fitted: set[str]) -> dict[str, str]:
    """``fit`` for a group with any photo among ``fitted``, else ``measure``."""
    return {g: "fit" if fitted & set(members) else "measure" for g, members in groups.items()}


def read_group_ids(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """The photo ids of each group of ``group,photo`` CSVs (group names unique across them)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for row in read_csv(Path(path)):
            groups[row["group"]].append(row["photo"])
    return dict(groups)


def link_photos(paths: Sequence[Path], folder: Path) -> Path:
    """A folder of symbolic links to ``paths`` (made anew)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def make_same_setting(photo_folders: Sequence[str | Path], fitted: str | Path, out: str | Path,
                      groups: Sequence[str | Path] = (GROUPS, MORE_GROUPS), n_refs: int = 150,
                      n_positives: int = 150, n_distractors: int = 60, seed: int = 21,
                      force: bool = False) -> Path:
    """Build the benchmark of the module docstring in ``out``; return ``out``."""
    out = Path(out)
    paths = [p for folder in photo_folders for p in list_images(folder).paths]
    by_id = {p.stem: p for p in paths}
    if len(by_id) < len(paths):
        raise ValueError("two photo folders hold photos of one id: give folders of other ids")
    clear_outputs(out, force)
    fitted_ids = set(list_images(fitted).ids)
    members = read_group_ids(groups)
    measured = sorted(g for g, part in group_parts(members, fitted_ids).items()
                      if part == "measure")
    grouped = {p for m in members.values() for p in m}
    chosen = [by_id[p] for g in measured for p in members[g] if p in by_id]
    fillers = [by_id[i] for i in sorted(by_id) if i not in grouped and i not in fitted_ids]
    folder = link_photos(chosen + fillers, out / "photos")
    measure_csv = write_csv(out / "groups.csv", ("group", "photo"),
                            [(g, p) for g in measured for p in members[g]])
    log.info("%d of %d groups held out whole (%d photos), %d filler photos", len(measured),
             len(members), len(chosen), len(fillers))
    return make_lookalike(folder, out, measure_csv, 0, n_refs, n_positives, n_distractors,
                          seed, force=force, lookalike_edits=(0, 0))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, nargs="+", required=True,
                        help="training photo folders (ids unique across them)")
    parser.add_argument("--fitted", type=Path, required=True,
                        help="the photo folder the shipped calibrations drew from")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder to write")
    parser.add_argument("--groups", type=Path, nargs="+", default=[GROUPS, MORE_GROUPS],
                        help="CSVs group,photo of real look-alikes")
    parser.add_argument("--refs", type=int, default=150, help="more reference photos")
    parser.add_argument("--positives", type=int, default=150, help="copies of those")
    parser.add_argument("--distractors", type=int, default=60)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: make_same_setting(
        args.photos, args.fitted, args.out, args.groups, args.refs, args.positives,
        args.distractors, args.seed, args.force))


if __name__ == "__main__":
    sys.exit(main())
