"""Stage: fuse the branches' pairs into the submission CSV.

    copydet merge --pairs local=<pairs.csv> global=<pairs.csv> crop_local=<pairs.csv> \\
        --out work/submission.csv

``merge.method: fusion`` (default): the pairs of every branch of ``merge.branches`` become
one candidate set, every pair gets every branch's features (computed where a branch did not
find it and can: ``merge.features``) and one calibrated score (``merge.fusion``).
``merge.method: max``: each pair keeps its best score over the branches' own scores, which
must be on one scale (e.g. ``-o merge.branches=[global] -o merge.method=max`` gives the
global branch alone; ``[local, crop_local]`` compares two calibrated probabilities).

The submission has the header ``query_id,reference_id,score``, one row per pair, float
scores, best first, and at most ``merge.max_pairs`` rows (the ISC cap of 500,000); with
``drop_self`` (``--drop-self-pairs``; ``pipeline.run`` sets it when the query and reference
folders are one) the pairs of an image with itself are left out of the candidates. Beside it,
``<name>.features.csv`` holds every candidate pair with the branches that found it, their
features (fusion) or own scores (max), and the score.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError, cli
from common.config import REPO_ROOT, output_name
from common.io import write_csv
from common.logs import start_run
from merge.branches import BranchEvidence, selected
from merge.evidence import Pair
from merge.features import PairTable, feature_names, gather, read_branches
from merge.fusion import FusionModel

STAGE = "merge"
SUBMISSION_COLUMNS = ["query_id", "reference_id", "score"]
METHODS = ("fusion", "max")
NOT_IN_NAME = ("fusion_model",)


def submission_rows(scores: Mapping[Pair, float], max_pairs: int) -> list[tuple]:
    """Rows best first (ties by ids, for determinism), capped at ``max_pairs``."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:max_pairs]
    return [(q, r, f"{s:.9g}") for (q, r), s in ranked]


def fusion_model(conf: dict[str, Any], branches: Sequence[BranchEvidence]) -> FusionModel:
    """The fusion model for ``branches``; one fitted for other branches is a ``UserError``
    naming the command that refits it."""
    return FusionModel.load(REPO_ROOT / conf[STAGE]["fusion_model"], feature_names(branches))


def fused_scores(conf: dict[str, Any], branches: Sequence[BranchEvidence],
                 pair_files: Mapping[str, Path], folder: Path,
                 drop_self: bool, unordered: bool = False) -> tuple[PairTable, np.ndarray]:
    """The candidate table and the calibrated fusion score of every pair (``unordered``:
    ``merge.features.gather``)."""
    model = fusion_model(conf, branches)  # checked before the costly fills
    table = gather(conf, branches, pair_files, folder, drop_self, unordered)
    return table, model.score(table)


def max_scores(conf: dict[str, Any], branches: Sequence[BranchEvidence],
               pair_files: Mapping[str, Path], folder: Path,
               drop_self: bool) -> tuple[PairTable, np.ndarray]:
    """The candidate table of the branches' own scores and the best of them per pair."""
    scales = {b.name: b.scale for b in branches}
    if len(set(scales.values())) > 1:
        raise UserError(f"merge.method=max compares the branches' own scores, which are on "
                        f"different scales here ({scales}): use merge.method=fusion, or "
                        "branches of one scale")
    evidence = read_branches(conf, branches, pair_files, drop_self)
    pairs = sorted(set().union(*(e.scores for e in evidence.values())))
    x = np.array([[evidence[b.name].scores.get(p, -np.inf) for b in branches] for p in pairs],
                 np.float64).reshape(len(pairs), len(branches))
    found_by = ["+".join(b.name for b in branches if p in evidence[b.name].scores)
                for p in pairs]
    table = PairTable(pairs, [f"{b.name}_score" for b in branches], x, found_by)
    return table, x.max(axis=1) if len(pairs) else np.zeros(0)


def run_folder(conf: dict[str, Any], pair_files: Mapping[str, Path], work_dir: Path,
               drop_self: bool = False) -> Path:
    """Named after the settings and the pairs files (which name everything upstream), and
    whether self-pairs are left out."""
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    inputs = {k: str(Path(v).resolve()) for k, v in sorted(pair_files.items())}
    return work_dir / STAGE / output_name(section, inputs,
                                             *(("no-self-pairs",) if drop_self else ()))


def features_path(submission: Path) -> Path:
    """The candidate table written beside a submission."""
    return submission.with_name(f"{submission.stem}.features.csv")


def main(conf: dict[str, Any], branches: Sequence[BranchEvidence],
         pair_files: Mapping[str, str | Path], work_dir: str | Path,
         out: str | Path | None = None, drop_self: bool = False) -> Path:
    """Write the submission CSV (module docstring) from the pairs files of ``branches``;
    return its path. ``drop_self``: the queries are the references, leave out the pairs of
    an image with itself."""
    section = conf[STAGE]
    if section["method"] not in METHODS:
        raise UserError(f"merge.method must be one of {METHODS}, not {section['method']!r}")
    pair_files = {k: Path(v) for k, v in pair_files.items()}
    work_dir = Path(work_dir)
    folder = run_folder(conf, pair_files, work_dir, drop_self)
    out = Path(out) if out else folder / "submission.csv"
    run = start_run(work_dir, STAGE)
    with run:
        scorer = fused_scores if section["method"] == "fusion" else max_scores
        table, scores = scorer(conf, branches, pair_files, folder, drop_self)
        rows = submission_rows(dict(zip(table.pairs, scores.tolist(), strict=True)),
                               section["max_pairs"])
        write_csv(features_path(out), ["query_id", "reference_id", "found_by",
                                       *table.features, "score"],
                  [(q, r, by, *(f"{v:.6g}" for v in x), f"{s:.9g}") for (q, r), by, x, s
                   in zip(table.pairs, table.found_by, table.x, scores, strict=True)])
        write_csv(out, SUBMISSION_COLUMNS, rows)
        run.logger.info("%s of %s: %d candidate pairs, %d written to %s", section["method"],
                        "+".join(b.name for b in branches), len(table.pairs), len(rows), out)
    return out


def parse_pair_files(items: list[str]) -> dict[str, Path]:
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--pairs {item!r} is not of the form NAME=FILE (e.g. global=...)")
        files[name] = Path(path)
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", nargs="+", required=True, metavar="NAME=FILE",
                        help="the pairs file of each branch of merge.branches (what "
                        "`copydet verify` / `copydet global-search` printed)")
    parser.add_argument("--out", type=Path, help="submission CSV (default: under --work)")
    parser.add_argument("--drop-self-pairs", action="store_true",
                        help="the queries are the references (one folder): leave out the pairs "
                        "of an image with itself (`copydet run` does this by itself)")


def call(conf: dict[str, Any], args: argparse.Namespace) -> Path:
    return main(conf, selected(conf["merge"]["branches"]),
                parse_pair_files(args.pairs), args.work, args.out, args.drop_self_pairs)


COMMAND = cli.Command("merge", __doc__, add_arguments, call)

if __name__ == "__main__":
    cli.run_module("merge.fuse")
