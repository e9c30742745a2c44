"""Stage: top-k search of global descriptors, with score normalisation against training photos.

    copydet global-search --h5 <descriptors.h5 of global-extract>

Reads the ISC h5 that ``global_fea.extract`` returned. Every query view (original, and mirrored when
described) takes its top-k references by inner product (cosine similarity of whitened,
L2-normalised descriptors), exactly, with reference blocks streamed from the h5 into a Faiss
result heap (all GPUs when faiss sees any). Similarities are then normalised as in the ISC2021
descriptor track: ``norm = sim - beta * mean(sim of the query to its n nearest training
photos)``, with the bank of whitened training-photo descriptors shipped next to the whitening
(``global_fea.whiten``; never the references). A query that looks like many ordinary photos
(a generic scene, a texture) is pushed down, a distinctive one keeps its score: the lever
that makes scores comparable across queries.

``pairs.csv`` has one row per (query, reference): the best view, its raw ``similarity``,
``norm_similarity``, the ``rank`` within the query and ``score`` (= norm_similarity), best
first, capped at ``global_search.max_pairs`` pairs over all queries (the ISC cap); beside it,
``inputs.json`` names the h5 (the fusion scores more pairs from it). Query blocks are written
atomically as parts, so a killed run resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np
from tqdm import tqdm

from common import UserError, cli, knn
from common.config import output_name
from common.io import read_csv, write_csv, write_inputs
from common.logs import start_run
from common.parallel import resolve_n_jobs
from global_fea import codec as whitening

STAGE = "global_search"
COLUMNS = ["query_id", "reference_id", "view", "similarity", "norm_similarity", "rank", "score"]
NOT_IN_NAME = ("block", "gpu")
QUERY_BLOCK = 8192


def query_views(f: h5py.File) -> dict[str, np.ndarray]:
    """The query descriptors of an ISC h5 per view (``orig``, and ``mirror`` when present)."""
    views = {"orig": np.asarray(f["query"], np.float32)}
    if "query_mirror" in f:
        views["mirror"] = np.asarray(f["query_mirror"], np.float32)
    return views


def read_ids(dataset: h5py.Dataset) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else str(i) for i in dataset[:]]


def reference_blocks(refs: h5py.Dataset, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(descriptors, row numbers) of the references, ``block`` rows at a time."""
    for start in range(0, len(refs), block):
        x = np.asarray(refs[start:start + block], np.float32)
        yield x, np.arange(start, start + len(x), dtype=np.int64)


def norm_offsets(x: np.ndarray, bank: np.ndarray, k: int, beta: float, gpu: bool) -> np.ndarray:
    """``beta`` x the mean similarity of each row of ``x`` to its ``k`` nearest bank rows."""
    if not beta or not k or not len(bank) or not len(x):
        return np.zeros(len(x), np.float32)
    k = min(k, len(bank))
    sims, _ = knn.exact_search(x, [(bank, np.arange(len(bank)))], k, gpu, knn.IP)
    return (beta * sims.mean(axis=1)).astype(np.float32)


def best_per_pair(
    queries: np.ndarray, view_hits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], k: int,
) -> list[tuple[int, int, str, float, float, int]]:
    """(query row, reference row, view, sim, norm, rank) of each query's top-k references,
    each reference once, with its best view by normalised similarity."""
    best: dict[tuple[int, int], tuple[float, float, str]] = {}
    for view, (sims, ids, offsets) in view_hits.items():
        for qi, row_sims, row_ids, offset in zip(queries, sims, ids, offsets, strict=True):
            for sim, ref in zip(row_sims, row_ids, strict=True):
                if ref < 0:
                    continue
                norm = float(sim - offset)
                key = (int(qi), int(ref))
                if key not in best or norm > best[key][1]:
                    best[key] = (float(sim), norm, view)
    rows, by_query = [], {}
    for (qi, ref), (sim, norm, view) in best.items():
        by_query.setdefault(qi, []).append((norm, sim, ref, view))
    for qi in sorted(by_query):
        ranked = sorted(by_query[qi], key=lambda t: (-t[0], t[2]))[:k]
        rows += [(qi, ref, view, sim, norm, rank)
                 for rank, (norm, sim, ref, view) in enumerate(ranked)]
    return rows


def search_block(f: h5py.File, views: dict[str, np.ndarray], rows: np.ndarray, bank: np.ndarray,
                 section: dict[str, Any], gpu: bool) -> list[tuple]:
    """Top-k rows of the query rows ``rows`` (all views, searched in one pass over the
    references)."""
    q = np.concatenate([x[rows] for x in views.values()])
    sims, ids = knn.exact_search(q, reference_blocks(f["reference"], section["block"]),
                                 section["k"], gpu, knn.IP)
    offsets = norm_offsets(q, bank, section["norm_k"], section["norm_beta"], gpu)
    n = len(rows)
    hits = {view: (sims[v * n:(v + 1) * n], ids[v * n:(v + 1) * n], offsets[v * n:(v + 1) * n])
            for v, view in enumerate(views)}
    return best_per_pair(rows, hits, section["k"])


def cap_rows(rows: list[list[str]], max_pairs: int) -> list[list[str]]:
    """Rows best score first (ties by ids), at most ``max_pairs`` (0: all)."""
    score = COLUMNS.index("score")
    ranked = sorted(rows, key=lambda r: (-float(r[score]), r[0], r[1]))
    return ranked[:max_pairs] if max_pairs else ranked


def search_root(conf: dict[str, Any], h5: Path, work_dir: str | Path) -> Path:
    """Named after the settings and the h5's contents (its stores' stamp), so a set that
    gained images, or other descriptors, never reuses old parts."""
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    with h5py.File(h5, "r") as f:
        stamp = str(f.attrs.get("stores", ""))
    upstream = f"{h5.parent.parent.parent.name}/{h5.parent.parent.name}/{stamp}"
    return Path(work_dir) / STAGE / output_name(section, upstream)


def pairs_path(conf: dict[str, Any], h5: Path, work_dir: str | Path) -> Path:
    """Where the pairs of an h5 (``<q>-vs-<r>/descriptors.h5``) go."""
    return search_root(conf, h5, work_dir) / h5.parent.name / "pairs.csv"


def main(conf: dict[str, Any], h5: Path, work_dir: str | Path) -> Path:
    """Search the queries' descriptors of ``h5`` in its references'; return ``pairs.csv``."""
    section = conf[STAGE]
    h5 = Path(h5)
    if not h5.is_file():
        raise UserError(f"no global descriptors at {h5}: give the file that "
                        "`copydet global-extract` printed")
    out = pairs_path(conf, h5, work_dir)
    run = start_run(work_dir, f"{STAGE}-{out.parent.name}")
    with run, h5py.File(h5, "r") as f:
        faiss.omp_set_num_threads(resolve_n_jobs(conf["run"]["n_jobs"]))
        gpu = knn.use_gpu(section, STAGE)
        q_ids, r_ids = read_ids(f["query_ids"]), read_ids(f["reference_ids"])
        n_blocks = (len(q_ids) + QUERY_BLOCK - 1) // QUERY_BLOCK
        parts = [out.parent / "parts" / f"part_{b:05d}.csv" for b in range(n_blocks)]
        todo = [b for b, p in enumerate(parts) if not p.exists()]
        run.logger.info("%d queries x %d references, k=%d, %d query block(s) to search -> %s",
                        len(q_ids), len(r_ids), section["k"], len(todo), out)
        if todo and len(r_ids):
            views = query_views(f)
            bank = (whitening.load_bank(conf["global_fea"]) if section["norm_beta"]
                    else np.zeros((0, views["orig"].shape[1]), np.float32))
            for b in tqdm(todo, desc="global search", unit="block"):
                rows = np.arange(b * QUERY_BLOCK, min(len(q_ids), (b + 1) * QUERY_BLOCK))
                found = search_block(f, views, rows, bank, section, gpu)
                write_csv(parts[b], COLUMNS, [
                    (q_ids[q], r_ids[r], view, f"{sim:.6f}", f"{norm:.6f}", rank, f"{norm:.6f}")
                    for q, r, view, sim, norm, rank in found])
        rows = [[r[c] for c in COLUMNS] for p in parts if p.exists() for r in read_csv(p)]
        kept = cap_rows(rows, section["max_pairs"])
        write_inputs(out, h5=h5)
        write_csv(out, COLUMNS, kept)
        run.logger.info("%d pairs (%d before the cap of %s)", len(kept), len(rows),
                        section["max_pairs"] or "none")
    return out


class GlobalScorer:
    """Global similarity of arbitrary (query, reference) pairs, from the h5 and the bank.

    Used by the fusion to fill in global evidence for pairs only other branches found.
    """

    def __init__(self, conf: dict[str, Any], h5: Path):
        section = conf[STAGE]
        with h5py.File(h5, "r") as f:
            self.views = query_views(f)
            self.q_row = {i: n for n, i in enumerate(read_ids(f["query_ids"]))}
            self.r_row = {i: n for n, i in enumerate(read_ids(f["reference_ids"]))}
        self.h5, self.section = h5, section
        self.gpu = knn.use_gpu(section, STAGE)
        self.bank = (whitening.load_bank(conf["global_fea"]) if section["norm_beta"]
                     else np.zeros((0, 1), np.float32))

    def score(self, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, normalised similarity) per pair, best view; NaN when a side has no
        descriptor (an image skipped as unreadable)."""
        sims = np.full(len(pairs), np.nan, np.float32)
        norms = np.full(len(pairs), np.nan, np.float32)
        known = [n for n, (q, r) in enumerate(pairs) if q in self.q_row and r in self.r_row]
        if not known:
            return sims, norms
        q = np.array([self.q_row[pairs[n][0]] for n in known])
        r = np.array([self.r_row[pairs[n][1]] for n in known])
        rows, inverse = np.unique(r, return_inverse=True)
        with h5py.File(self.h5, "r") as f:
            dataset = f["reference"]
            if len(rows) > len(dataset) // 20:  # many rows: one sequential read is faster
                refs = np.asarray(dataset[:], np.float32)[r]
            else:
                refs = np.asarray(dataset[rows], np.float32)[inverse]
        best_sim = np.full(len(known), -np.inf, np.float32)
        best_norm = np.full(len(known), -np.inf, np.float32)
        q_rows, q_inverse = np.unique(q, return_inverse=True)  # offsets of these queries only
        for x in self.views.values():
            offsets = norm_offsets(x[q_rows], self.bank, self.section["norm_k"],
                                   self.section["norm_beta"], self.gpu)[q_inverse]
            sim = np.einsum("nd,nd->n", x[q], refs)
            norm = sim - offsets
            better = norm > best_norm
            best_sim[better], best_norm[better] = sim[better], norm[better]
        sims[known], norms[known] = best_sim, best_norm
        return sims, norms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--h5", required=True, type=Path,
                        help="descriptors.h5 (what `copydet global-extract` printed)")


COMMAND = cli.Command("global-search", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.h5, a.work))

if __name__ == "__main__":
    cli.run_module("global_fea.search")
