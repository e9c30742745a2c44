"""Stage: verify candidate pairs and give each a calibrated score.

    copydet verify --queries <query store> --references <reference store> --candidates <csv>

Every (query view, reference) candidate is matched and verified (``match_score.geometry``);
pairs are processed in fixed chunks, in parallel, each chunk written atomically, so a killed
run resumes where it stopped. ``pairs.csv`` then gets one row per verified (query, view,
reference) with its features and its calibrated score (``match_score.score``), and
``inputs.json`` beside it names the feature stores it was verified with (the fusion's fill
verifies more pairs with them).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from common import UserError, cli
from common.config import REPO_ROOT, digest, output_name
from common.io import read_csv, write_csv, write_inputs
from common.logs import start_run
from common.parallel import limit_threads, parallel_map
from common.shards import ShardStore
from local_fea.features import LocalFeatures
from match_score.geometry import FIELDS, Verification, verify
from match_score.score import ScoreModel

STAGE = "match_score"
PAIR_COLUMNS = ["query_id", "reference_id", "view", "votes", *FIELDS]
NOT_IN_NAME = ("score_model",)


def match_root(conf: dict[str, Any], search_name: str, work_dir: str | Path) -> Path:
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    return Path(work_dir) / STAGE / output_name(section, search_name)


@functools.lru_cache(maxsize=8)
def _features(root: str, revision: str) -> LocalFeatures:
    """A store's features, cached per process and per revision: a store that gained or
    lost images since (a long-lived worker verifying again) is read afresh."""
    return LocalFeatures(root)


def features_of(root: str | Path, revision: str | None = None) -> LocalFeatures:
    """The features of the store at ``root``; give its ``revision`` when known (reading the
    manifest of a million references for it, chunk after chunk, is not free)."""
    return _features(str(root), revision or ShardStore(root).revision)


def candidate_pairs(candidates: Path | list[dict[str, str]]) -> list[tuple[str, str, str, str]]:
    """(query_id, reference_id, view, votes) to verify, sorted, one per proposing view."""
    rows = read_csv(candidates) if isinstance(candidates, Path) else candidates
    pairs = {(r["query_id"], r["reference_id"], r["view"]): r.get("votes", "") for r in rows}
    return [(q, r, v, votes) for (q, r, v), votes in sorted(pairs.items())]


def verify_chunk(
    chunk: tuple[int, list[tuple[str, str, str, str]]], queries: str, references: str,
    conf: dict[str, Any], feature_short_side: int, out_dir: Path,
    revisions: tuple[str | None, str | None] = (None, None),
) -> int:
    """Verify one chunk of pairs and write its rows; return the chunk index."""
    limit_threads()
    index, pairs = chunk
    qf, rf = features_of(queries, revisions[0]), features_of(references, revisions[1])
    rows = []
    for query_id, ref_id, view, votes in pairs:
        result = verify_view(qf, rf, query_id, ref_id, view, conf, feature_short_side)
        rows.append([query_id, ref_id, view, votes, *result.row()])
    write_csv(chunk_path(out_dir, index, pairs), PAIR_COLUMNS, rows)
    return index


def verify_view(qf: LocalFeatures, rf: LocalFeatures, query_id: str, ref_id: str, view: str,
                conf: dict[str, Any], feature_short_side: int) -> Verification:
    """Verify one view of a query against a reference (geometry and photometry)."""
    q, r = qf.image(query_id, view), rf.image(ref_id)
    q_thumb = q.thumb[:, ::-1] if view == "mirror" else q.thumb
    return verify(q.views[view], r.views["orig"], (q_thumb, q.size), (r.thumb, r.size), conf,
                  feature_short_side)


def chunk_path(out_dir: Path, index: int, pairs: list[tuple[str, str, str, str]]) -> Path:
    """A chunk's file, named after its pairs: a chunk whose pairs changed (references added
    or removed upstream) is verified again, an unchanged one is reused."""
    return out_dir / f"chunk_{index:05d}-{digest(pairs)}.csv"


def verify_pairs(
    conf: dict[str, Any], pairs: list[tuple[str, str, str, str]], queries: Path,
    references: Path, out_dir: Path, desc: str = "verify",
) -> list[dict[str, str]]:
    """Verify ``pairs`` in resumable chunks under ``out_dir``; return all verified rows."""
    size = conf[STAGE]["chunk_pairs"]
    chunks = [(i, pairs[s:s + size]) for i, s in enumerate(range(0, len(pairs), size))]
    parts = [chunk_path(out_dir, i, c) for i, c in chunks]
    todo = [c for c, p in zip(chunks, parts, strict=True) if not p.exists()]
    work = functools.partial(
        verify_chunk, queries=str(queries), references=str(references), conf=conf[STAGE],
        feature_short_side=conf["local_fea"]["short_side"], out_dir=out_dir,
        revisions=(ShardStore(queries).revision, ShardStore(references).revision))
    for _ in parallel_map(work, todo, n_jobs=conf["run"]["n_jobs"], desc=desc, unit="pair",
                          total=sum(len(c[1]) for c in todo),
                          weight=lambda i: len(chunks[i][1])):
        pass
    for stale in set(out_dir.glob("chunk_*.csv")) - set(parts):
        stale.unlink()
    return [row for p in parts for row in read_csv(p)]


def score_rows(rows: list[dict[str, str]], model: ScoreModel) -> list[list]:
    """Rows with their calibrated score appended, best first."""
    scores = model.predict(rows) if rows else []
    scored = [[r[c] for c in PAIR_COLUMNS] + [f"{s:.9g}"] for r, s in zip(rows, scores,
                                                                          strict=True)]
    return sorted(scored, key=lambda r: (-float(r[-1]), r[0], r[1], r[2]))


def pairs_path(conf: dict[str, Any], candidates: Path, work_dir: str | Path) -> Path:
    """Where the scored pairs of a candidates file go."""
    search_name = candidates.parent.parent.name
    return match_root(conf, search_name, work_dir) / candidates.parent.name / "pairs.csv"


def main(conf: dict[str, Any], queries: Path, references: Path, candidates: Path,
         work_dir: str | Path) -> Path:
    """Verify the candidate pairs (``local_fea.search``'s output) with the query and
    reference feature stores they were searched with; return ``pairs.csv``."""
    candidates = Path(candidates)
    if not candidates.exists():
        raise UserError(f"no candidates at {candidates}: give the file that `copydet search` "
                        "printed")
    out = pairs_path(conf, candidates, work_dir)
    run = start_run(work_dir, f"{STAGE}-{out.parent.name}")
    with run:
        model = ScoreModel.load(REPO_ROOT / conf[STAGE]["score_model"])
        pairs = candidate_pairs(candidates)
        run.logger.info("%d candidate (query view, reference) pairs -> %s", len(pairs), out)
        rows = verify_pairs(conf, pairs, Path(queries), Path(references), out.parent / "parts")
        write_inputs(out, queries=queries, references=references)
        write_csv(out, [*PAIR_COLUMNS, "score"], score_rows(rows, model))
        run.logger.info("%d pairs verified, %d with inliers", len(rows),
                        sum(int(r["inliers"]) > 0 for r in rows))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, type=Path, help="query feature store")
    parser.add_argument("--references", required=True, type=Path,
                        help="reference feature store")
    parser.add_argument("--candidates", required=True, type=Path,
                        help="candidates.csv (what `copydet search` printed)")


COMMAND = cli.Command("verify", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.queries, a.references, a.candidates, a.work))

if __name__ == "__main__":
    cli.run_module("match_score.verify")
