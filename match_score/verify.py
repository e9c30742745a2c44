"""Stage: verify candidate pairs and give each a calibrated score.

    copydet verify --queries <query store> --references <reference store> --candidates <csv>
        [--query-boxes <boxes.csv>] [--reference-boxes <boxes.csv>]

Every (query view, reference) candidate is matched and verified (``match_score.geometry``);
pairs are processed in fixed chunks, in parallel, each chunk written atomically, so a killed
run resumes where it stopped. ``pairs.csv`` then gets one row per verified (query, view,
reference) with its features and its calibrated score (``match_score.score``), and
``inputs.json`` beside it names the feature stores and detector boxes it was verified with
(the fusion's fill verifies more pairs with them). Given the overlay detector's ``boxes.csv``
of the queries (and of the references, when they are one folder: ``copydet dedupe``), inliers
on a frame around a detected picture are counted and are no evidence
(``match_score.frames``; with ``match_score.frames: false`` boxes are ignored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError, cli
from common.config import REPO_ROOT, digest, file_digest, output_name
from common.io import read_csv, write_csv, write_inputs
from common.logs import start_run
from common.parallel import limit_threads, parallel_map, spread, workers
from local_fea.features import ImageFeatures, LocalFeatures
from match_score.frames import Box, content_boxes, frame_around, frame_inliers
from match_score.geometry import FIELDS, Verification, verify
from match_score.pair_net import MISSING, PairVerifier, load_weights
from match_score.score import ScoreModel, evidence_inliers

STAGE = "match_score"
PAIR_COLUMNS = ["query_id", "reference_id", "view", "votes", *FIELDS, "pair_logit"]
# the pair model is named by its file's digest, the frames by the boxes they are taken from
NOT_IN_NAME = ("score_model", "pair_model", "frames")
Pairs = list[tuple[str, str, str, str]]  # (query_id, reference_id, view, votes)
TASKS_PER_WORKER = 4  # tasks per worker: a balanced load, and stores opened a few times


def match_root(conf: dict[str, Any], search_name: str, work_dir: str | Path,
               boxes: tuple[Path | None, Path | None] = (None, None)) -> Path:
    """The stage's folder for one search's candidates; named by its settings, the pair
    verifier's file and the detector boxes the frames are taken from."""
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    frames = [digest(sorted(content_boxes(b).items())) if b else "none" for b in boxes]
    return Path(work_dir) / STAGE / output_name(section, search_name,
                                                pair_model_digest(conf[STAGE]), *frames)


def pair_model_digest(section: dict[str, Any]) -> str:
    """What names the pair verifier in output names: its file's digest, or ``none``."""
    path = section.get("pair_model")
    return file_digest(REPO_ROOT / path) if path else "none"


def pair_verifier(section: dict[str, Any]) -> PairVerifier | None:
    """The pair verifier of ``match_score.pair_model`` (None when it is null)."""
    path = section.get("pair_model")
    return PairVerifier(REPO_ROOT / path) if path else None


def candidate_pairs(candidates: Path | list[dict[str, str]]) -> Pairs:
    """(query_id, reference_id, view, votes) to verify, sorted, one per proposing view."""
    rows = read_csv(candidates) if isinstance(candidates, Path) else candidates
    pairs = {(r["query_id"], r["reference_id"], r["view"]): r.get("votes", "") for r in rows}
    return [(q, r, v, votes) for (q, r, v), votes in sorted(pairs.items())]



@dataclass(frozen=True, eq=False)  # hashed by identity (its conf is a dict)
class ChunkVerifier:
    """A task of the execution layer: verify a few chunks of pairs, writing each chunk's rows
    atomically; it opens the two feature stores once per task (it holds no state between
    tasks, so a store that changed since is read afresh)."""

    queries: str
    references: str
    conf: dict[str, Any]  # the match_score section
    feature_short_side: int
    out_dir: Path
    boxes: tuple[str | None, str | None] = (None, None)  # detector boxes: queries, references

    def __call__(self, chunks: list[tuple[int, Pairs]]) -> int:
        """Verify ``chunks`` ((index, pairs) each); return the number of pairs verified."""
        net = pair_verifier(self.conf)
        limit_threads()
        qf, rf = LocalFeatures(self.queries), LocalFeatures(self.references)
        query_boxes, reference_boxes = (content_boxes(b and Path(b)) for b in self.boxes)
        for index, pairs in chunks:
            done = [verify_view(qf, rf, q, r, view, self.conf, self.feature_short_side,
                                (query_boxes.get(q), reference_boxes.get(r)))
                    for q, r, view, _ in pairs]
            logits = (net.logits([v.aligned for v in done]) if net else
                      np.full(len(done), MISSING))
            rows = [[q, r, view, votes, *v.row(), f"{logit:.4f}"] for (q, r, view, votes), v,
                    logit in zip(pairs, done, logits, strict=True)]
            write_csv(chunk_path(self.out_dir, index, pairs), PAIR_COLUMNS, rows)
        return sum(len(pairs) for _, pairs in chunks)


def verify_view(qf: LocalFeatures, rf: LocalFeatures, query_id: str, ref_id: str, view: str,
                conf: dict[str, Any], feature_short_side: int,
                boxes: tuple[Box | None, Box | None] = (None, None)) -> Verification:
    """Verify one view of a query against a reference (geometry and photometry); ``boxes``:
    the detector's box in each (inliers on a frame around a box are frame)."""
    q, r = qf.image(query_id, view), rf.image(ref_id)
    q_thumb = q.thumb[:, ::-1] if view == "mirror" else q.thumb
    result = verify(q.views[view], r.views["orig"], (q_thumb, q.size), (r.thumb, r.size), conf,
                    feature_short_side)
    count_frame_inliers(result, q, r, view, boxes)
    return result


def count_frame_inliers(result: Verification, query: ImageFeatures, reference: ImageFeatures,
                        view: str, boxes: tuple[Box | None, Box | None]) -> None:
    """Set ``result.frame_inliers``: its inliers on a frame around the detector's box of
    either image (``boxes``; the query's ``view`` was verified)."""
    if not result.inliers or not any(boxes):
        return
    query_frame, reference_frame = (frame_around(box, image.thumb, image.size)
                                    for box, image in zip(boxes, (query, reference), strict=True))
    if query_frame and view == "mirror":
        query_frame = query_frame.mirrored()
    src, dst = result.points
    inlier = result.plane > 0
    result.frame_inliers = frame_inliers((src[inlier], dst[inlier]), query_frame,
                                         reference_frame)


def chunk_path(out_dir: Path, index: int, pairs: Pairs) -> Path:
    """A chunk's file, named after its pairs: a chunk whose pairs changed (references added
    or removed upstream) is verified again, an unchanged one is reused."""
    return out_dir / f"chunk_{index:05d}-{digest(pairs)}.csv"


def verify_pairs(
    conf: dict[str, Any], pairs: Pairs, queries: Path,
    references: Path, out_dir: Path, desc: str = "verify",
    boxes: tuple[Path | None, Path | None] = (None, None),
) -> list[dict[str, str]]:
    """Verify ``pairs`` in resumable chunks under ``out_dir``; return all verified rows.
    ``boxes``: the detector's ``boxes.csv`` of the queries and of the references, or None."""
    size = conf[STAGE]["chunk_pairs"]
    chunks = [(i, pairs[s:s + size]) for i, s in enumerate(range(0, len(pairs), size))]
    parts = [chunk_path(out_dir, i, c) for i, c in chunks]
    todo = [c for c, p in zip(chunks, parts, strict=True) if not p.exists()]
    verifier = ChunkVerifier(str(queries), str(references), conf[STAGE],
                             conf["local_fea"]["short_side"], out_dir,
                             tuple(str(b) if b else None for b in boxes))
    tasks = spread(todo, TASKS_PER_WORKER * workers(conf["run"]["n_jobs"]))
    for _ in parallel_map(verifier, tasks, n_jobs=conf["run"]["n_jobs"], desc=desc,
                          unit="pair", total=sum(len(c[1]) for c in todo), weight=int):
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


def pairs_path(conf: dict[str, Any], candidates: Path, work_dir: str | Path,
               boxes: tuple[Path | None, Path | None] = (None, None)) -> Path:
    """Where the scored pairs of a candidates file go."""
    search_name = candidates.parent.parent.name
    return (match_root(conf, search_name, work_dir, boxes) / candidates.parent.name
            / "pairs.csv")


def main(conf: dict[str, Any], queries: Path, references: Path, candidates: Path,
         work_dir: str | Path, query_boxes: Path | None = None,
         reference_boxes: Path | None = None) -> Path:
    """Verify the candidate pairs (``local_fea.search``'s output) with the query and
    reference feature stores they were searched with; return ``pairs.csv``. ``*_boxes``:
    the overlay detector's ``boxes.csv`` of either side (frames, module docstring)."""
    candidates = Path(candidates)
    if not candidates.exists():
        raise UserError(f"no candidates at {candidates}: give the file that `copydet search` "
                        "printed")
    boxes = (query_boxes, reference_boxes) if conf[STAGE]["frames"] else (None, None)
    out = pairs_path(conf, candidates, work_dir, boxes)  # reads the boxes: a bad file stops here
    run = start_run(work_dir, f"{STAGE}-{out.parent.name}")
    with run:
        model = ScoreModel.load(REPO_ROOT / conf[STAGE]["score_model"])
        if conf[STAGE].get("pair_model"):  # a missing or foreign one stops here, not in a task
            load_weights(REPO_ROOT / conf[STAGE]["pair_model"])
        pairs = candidate_pairs(candidates)
        run.logger.info("%d candidate (query view, reference) pairs -> %s", len(pairs), out)
        rows = verify_pairs(conf, pairs, Path(queries), Path(references), out.parent / "parts",
                            boxes=boxes)
        write_inputs(out, queries=queries, references=references,
                     **{f"{side}_boxes": b for side, b in zip(("query", "reference"), boxes,
                                                               strict=True) if b})
        write_csv(out, [*PAIR_COLUMNS, "score"], score_rows(rows, model))
        with_inliers = [r for r in rows if int(r["inliers"]) > 0]
        run.logger.info("%d pairs verified, %d with inliers, %d of them no evidence (on a "
                        "frame)", len(rows), len(with_inliers),
                        int((evidence_inliers(with_inliers) == 0).sum()))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, type=Path, help="query feature store")
    parser.add_argument("--references", required=True, type=Path,
                        help="reference feature store")
    parser.add_argument("--candidates", required=True, type=Path,
                        help="candidates.csv (what `copydet search` printed)")
    parser.add_argument("--query-boxes", type=Path, help="boxes.csv of the queries (what "
                        "`copydet detect` printed): inliers on a frame around a detected "
                        "picture are no evidence (match_score.frames)")
    parser.add_argument("--reference-boxes", type=Path,
                        help="boxes.csv of the references, the same for their frames")


COMMAND = cli.Command("verify", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.queries, a.references, a.candidates, a.work,
                                           a.query_boxes, a.reference_boxes))

if __name__ == "__main__":
    cli.run_module("match_score.verify")
