"""Stage: fuse the branches' pairs into the submission CSV.

    python -m merge.fuse --queries data/queryimages --references data/referenceimages \\
        --out work/submission.csv

``merge.method: fusion`` (default): the pairs of every branch of ``merge.branches`` become
one candidate set, every pair gets every branch's features (computed where a branch did not
find it and can: ``merge.features``) and one calibrated score (``merge.fusion``).
``merge.method: max``: each pair keeps its best score over the branches' own scores (e.g.
``-o merge.branches=[global] -o merge.method=max`` gives the global branch alone).

The submission has the header ``query_id,reference_id,score``, one row per pair, float
scores, best first, and at most ``merge.max_pairs`` rows (the ISC cap of 500,000).
``--pairs NAME=FILE`` gives a branch's pairs file instead of locating it from the folders.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError, cli
from common.config import REPO_ROOT, output_name
from common.io import write_csv
from common.logs import start_run
from merge.branches import Context, Pair, selected
from merge.features import gather, read_branches
from merge.fusion import FusionModel

STAGE = "merge"
SUBMISSION_COLUMNS = ["query_id", "reference_id", "score"]
METHODS = ("fusion", "max")
NOT_IN_NAME = ("fusion_model",)


def submission_rows(scores: Mapping[Pair, float], max_pairs: int) -> list[tuple]:
    """Rows best first (ties by ids, for determinism), capped at ``max_pairs``."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:max_pairs]
    return [(q, r, f"{s:.9g}") for (q, r), s in ranked]


def fused_scores(ctx: Context, pair_files: Mapping[str, Path]) -> dict[Pair, float]:
    """The calibrated fusion score of every candidate pair."""
    section = ctx.conf[STAGE]
    branches = selected(section["branches"])
    features = [f for b in branches for f in b.features]  # checked before the costly fills
    model = FusionModel.load(REPO_ROOT / section["fusion_model"], features)
    table = gather(ctx, branches, pair_files)
    return dict(zip(table.pairs, model.score(table).tolist(), strict=True))


def max_scores(ctx: Context, pair_files: Mapping[str, Path]) -> dict[Pair, float]:
    """The best of the branches' own scores of every pair."""
    best: dict[Pair, float] = {}
    evidence = read_branches(ctx, selected(ctx.conf[STAGE]["branches"]), pair_files)
    for own in evidence.values():
        for pair, score in own.scores.items():
            best[pair] = max(score, best.get(pair, -np.inf))
    return best


def run_folder(conf: dict[str, Any], queries: Path | None, references: Path | None,
               work_dir: Path, pair_files: Mapping[str, Path]) -> Path:
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    sets = f"{queries.resolve().name}-vs-{references.resolve().name}" if queries else "pairs"
    inputs = [str(queries and queries.resolve()), str(references and references.resolve()),
              {k: str(Path(v).resolve()) for k, v in sorted(pair_files.items())}]
    return work_dir / STAGE / output_name(section, *map(str, inputs)) / sets


def main(
    conf: dict[str, Any], queries: str | Path | None, references: str | Path | None,
    work_dir: str | Path, out: str | Path | None = None,
    pair_files: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write the submission CSV (module docstring); return its path."""
    section = conf[STAGE]
    if section["method"] not in METHODS:
        raise UserError(f"merge.method must be one of {METHODS}, not {section['method']!r}")
    pair_files = {k: Path(v) for k, v in (pair_files or {}).items()}
    located = [b for b in section["branches"] if b not in pair_files]
    if located and (queries is None or references is None):
        raise UserError(f"give --queries and --references to locate the pairs of {located}, "
                        "or --pairs NAME=FILE for every branch")
    queries = Path(queries) if queries else None
    references = Path(references) if references else None
    work_dir = Path(work_dir)
    folder = run_folder(conf, queries, references, work_dir, pair_files)
    out = Path(out) if out else folder / "submission.csv"
    run = start_run(work_dir, STAGE)
    with run:
        ctx = Context(conf, queries, references, work_dir, folder)
        scorer = fused_scores if section["method"] == "fusion" else max_scores
        scores = scorer(ctx, pair_files)
        rows = submission_rows(scores, section["max_pairs"])
        write_csv(out, SUBMISSION_COLUMNS, rows)
        run.logger.info("%s of %s: %d candidate pairs, %d written to %s", section["method"],
                        "+".join(section["branches"]), len(scores), len(rows), out)
    return out


def parse_pair_files(items: list[str]) -> dict[str, Path]:
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--pairs {item!r} is not of the form NAME=FILE (e.g. global=...)")
        files[name] = Path(path)
    return files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_set_args(parser, required=False)
    parser.add_argument("--pairs", nargs="+", default=[], metavar="NAME=FILE",
                        help="a branch's pairs file (default: located from the folders)")
    parser.add_argument("--out", type=Path, help="submission CSV (default: under --work)")
    cli.add_common_args(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        pair_files = parse_pair_files(args.pairs)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    cli.run_main(main, cli.config_from_args(args), args.queries, args.references, args.work,
                 args.out, pair_files)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from merge import fuse

    fuse.run_cli()
