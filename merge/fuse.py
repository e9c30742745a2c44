"""Stage: fuse the branches' scored pairs into the submission CSV.

    python -m merge.fuse --queries data/queryimages --references data/referenceimages \\
        --out work/submission.csv

Each (query, reference) pair keeps its best calibrated score over the branches and views
that found it. ``merge.branches`` lists the branches fused (each one whose pairs exist);
``merge.min_score`` gives a branch a floor under which its scores are ignored: the crop-local
branch runs a second, independent search for the queries it crops, so its weak matches would
add false positives that the whole-query search did not make; from 0.5 up (a calibrated
verdict "copy") it only adds confident evidence. The submission has the header
``query_id,reference_id,score``, unique pairs, best first, and at most ``merge.max_pairs``
rows (the ISC cap of 500,000).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import UserError, cli
from common.config import output_name
from common.io import read_csv, write_csv
from common.logs import start_run
from local_fea.extract import store_for
from local_fea.search import candidates_path
from match_score import verify
from preprocess import crop_local

STAGE = "merge"
SUBMISSION_COLUMNS = ["query_id", "reference_id", "score"]


def best_scores(pair_files: Sequence[Path],
                floors: Sequence[float] = ()) -> dict[tuple[str, str], float]:
    """The best score of every (query, reference) pair over all files and views; a file's
    scores under its floor (``floors``, parallel to ``pair_files``; default 0) are ignored."""
    best: dict[tuple[str, str], float] = {}
    floors = list(floors) or [0.0] * len(pair_files)
    for path, floor in zip(pair_files, floors, strict=True):
        if not Path(path).exists():
            raise UserError(f"pairs file not found: {path}")
        for row in read_csv(path):
            key = (row["query_id"], row["reference_id"])
            score = float(row["score"])
            if score >= floor and score > best.get(key, 0.0):
                best[key] = score
    return best


def submission_rows(best: dict[tuple[str, str], float], max_pairs: int) -> list[tuple]:
    """Rows best first (ties by ids, for determinism), capped at ``max_pairs``."""
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:max_pairs]
    return [(q, r, f"{s:.9g}") for (q, r), s in ranked]


def branch_pairs(conf: dict[str, Any], queries: Path, references: Path,
                 work_dir: str | Path) -> dict[str, Path]:
    """The scored pairs file of every branch that has run for these query/reference sets."""
    q_store = store_for(conf, queries, work_dir)
    r_store = store_for(conf, references, work_dir)
    local = verify.pairs_path(conf, candidates_path(conf, q_store, r_store, work_dir), work_dir)
    branches = {"local": local}
    crops = crop_local.pairs_path(conf, queries, references, work_dir)
    if crops.exists():  # optional branch: only when the overlay detector has run
        branches["crop_local"] = crops
    return branches


def main(
    conf: dict[str, Any], queries: str | Path | None, references: str | Path | None,
    work_dir: str | Path, out: str | Path | None = None,
    pair_files: Sequence[str | Path] = (),
) -> Path:
    """Write the submission CSV from the branches' pairs files (given, or found from the
    query and reference folders); return its path."""
    mconf = conf[STAGE]
    floors: list[float] = []
    if not pair_files:
        if queries is None or references is None:
            raise UserError("give --queries and --references, or --pairs")
        branches = branch_pairs(conf, Path(queries), Path(references), work_dir)
        unknown = set(mconf["branches"]) - {"local", "crop_local"}
        if unknown:
            raise UserError(f"merge.branches: unknown branch(es) {sorted(unknown)}")
        chosen = [b for b in mconf["branches"] if b in branches]
        pair_files = [branches[b] for b in chosen]
        floors = [mconf["min_score"].get(b, 0.0) for b in chosen]
    pair_files = [Path(p) for p in pair_files]
    name = output_name(mconf, *[str(p.resolve()) for p in pair_files])
    out = Path(out) if out else Path(work_dir) / STAGE / name / "submission.csv"
    run = start_run(work_dir, STAGE)
    with run:
        best = best_scores(pair_files, floors)
        rows = submission_rows(best, mconf["max_pairs"])
        write_csv(out, SUBMISSION_COLUMNS, rows)
        run.logger.info("%d pairs from %s; %d written to %s", len(best),
                        ", ".join(str(p) for p in pair_files), len(rows), out)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=Path, help="query images (or their feature store)")
    parser.add_argument("--references", type=Path,
                        help="reference images (or their feature store)")
    parser.add_argument("--pairs", nargs="+", type=Path, default=[],
                        help="scored pairs.csv files to fuse (default: every branch's)")
    parser.add_argument("--out", type=Path, help="submission CSV (default: under --work)")
    cli.add_common_args(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_main(main, cli.config_from_args(args), args.queries, args.references, args.work,
                 args.out, args.pairs)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from merge import fuse

    fuse.run_cli()
