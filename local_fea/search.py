"""Stage: local descriptor search, giving each query view its top-C candidate references.

    python -m local_fea.search --queries data/queryimages --references data/referenceimages

Every query descriptor takes its k nearest reference descriptors; each neighbour votes for
its reference image with weight ``max(0, 1 - d_i / d_k)`` (squared L2 distances): a soft
ratio test in which a neighbour no closer than the k-th counts nothing, and a reference
counts once per query descriptor. Votes are summed per (query view, reference) in sparse
form; each query view keeps its C best references. Query shards are searched one at a time
(bounded memory) and each writes its part atomically, so a restarted run resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from common import cli
from common.config import output_name
from common.io import read_csv, write_csv
from common.logs import start_run
from common.parallel import resolve_n_jobs
from common.shards import ShardStore
from local_fea.extract import store_for
from local_fea.index import (
    EXACT,
    ReferenceIndex,
    decode_images,
    exact_search,
    reference_blocks,
    use_gpu,
)

STAGE = "local_search"
COLUMNS = ["query_id", "view", "reference_id", "votes", "rank"]


def search_root(conf: dict[str, Any], features_name: str, work_dir: str | Path) -> Path:
    return Path(work_dir) / STAGE / output_name(conf[STAGE], features_name)


def vote(
    units: np.ndarray, dist: np.ndarray, ids: np.ndarray, candidates: int
) -> list[tuple[int, int, float, int]]:
    """Top-``candidates`` (unit, reference number, votes, rank) from k-NN results.

    ``units[i]`` is the query view that descriptor ``i`` belongs to.
    """
    refs = decode_images(ids)
    dist = np.where(refs >= 0, dist, -np.inf)
    far = dist.max(axis=1, keepdims=True)  # the k-th (last found) neighbour's distance
    weight = np.where(far > 0, np.clip(1.0 - dist / np.where(far > 0, far, 1), 0, 1), 0)
    weight[refs < 0] = 0
    for j in range(1, refs.shape[1]):  # a reference counts once per query descriptor
        weight[:, j][(refs[:, :j] == refs[:, j:j + 1]).any(axis=1)] = 0
    keep = weight.ravel() > 0
    unit_col = np.repeat(units, refs.shape[1])[keep]
    ref_col = refs.ravel()[keep]
    pairs, inverse = np.unique(np.stack([unit_col, ref_col], 1), axis=0, return_inverse=True)
    votes = np.bincount(inverse.ravel(), weights=weight.ravel()[keep], minlength=len(pairs))
    order = np.lexsort((pairs[:, 1], -votes, pairs[:, 0]))
    out, previous, rank = [], None, 0
    for i in order:
        unit = int(pairs[i, 0])
        rank = rank + 1 if unit == previous else 0
        previous = unit
        if rank < candidates:
            out.append((unit, int(pairs[i, 1]), float(votes[i]), rank))
    return out


def query_block(store: ShardStore, k: int) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Query views of shard ``k``: their (id, view) names, descriptor owners, descriptors."""
    shard = store.load(k)
    names, owners, descs = [], [], []
    for view, packed in shard["views"].items():
        offsets = packed["desc"]["offsets"]
        for row, image_id in enumerate(shard["ids"]):
            n = offsets[row + 1] - offsets[row]
            if n:
                owners.append(np.full(n, len(names)))
                descs.append(packed["desc"]["data"][offsets[row]:offsets[row + 1]])
                names.append((image_id, view))
    if not names:
        return [], np.zeros(0, np.int64), np.zeros((0, 128), np.float32)
    return names, np.concatenate(owners), np.concatenate(descs).astype(np.float32)


def search_shard(
    k: int, queries: ShardStore, references: ShardStore, searcher, conf: dict[str, Any], out: Path
) -> int:
    """Search one query shard and write its candidates; return the number of rows."""
    names, owners, desc = query_block(queries, k)
    rows = []
    if len(desc):
        dist, ids = searcher(desc)
        for unit, ref, votes, rank in vote(owners, dist, ids, conf["candidates"]):
            image_id, view = names[unit]
            rows.append((image_id, view, references.id_of(ref), f"{votes:.4f}", rank))
    rows.sort(key=lambda r: (r[0], r[1], r[4]))
    write_csv(out, COLUMNS, rows)
    return len(rows)


def make_searcher(conf: dict[str, Any], references: ShardStore, folder: Path,
                  features_name: str):
    """A function descriptors -> (squared distances, ids) for the configured index."""
    if conf["index"] == EXACT or use_gpu(conf):
        gpu = use_gpu(conf)
        shards = range(len(references.shards))
        return lambda q: exact_search(q, reference_blocks(references, shards), conf["k"], gpu)
    index = ReferenceIndex(folder, conf, features_name).open(references)
    return lambda q: index.search(q, conf["k"])


def candidates_path(conf: dict[str, Any], queries: Path, references: Path,
                    work_dir: str | Path) -> Path:
    """Where the candidates of two feature stores go (``<q set>-vs-<r set>/candidates.csv``)."""
    root = search_root(conf, references.parent.name, work_dir)
    return root / f"{queries.name}-vs-{references.name}" / "candidates.csv"


def main(
    conf: dict[str, Any], queries: str | Path, references: str | Path, work_dir: str | Path
) -> Path:
    """Search every query view in the references (feature stores, or their image folders)."""
    queries, references = store_for(conf, queries, work_dir), store_for(conf, references, work_dir)
    query_store, ref_store = ShardStore(queries), ShardStore(references)
    features_name = references.parent.name
    root = search_root(conf, features_name, work_dir)
    out = candidates_path(conf, queries, references, work_dir).parent
    sconf = conf[STAGE]
    run = start_run(work_dir, f"{STAGE}-{out.name}")
    with run:
        faiss.omp_set_num_threads(resolve_n_jobs(conf["run"]["n_jobs"]))
        parts = [out / "parts" / f"part_{k:05d}.csv" for k in range(len(query_store.shards))]
        todo = [k for k, p in enumerate(parts) if not p.exists()]
        run.logger.info("%d query shard(s), %d to search, index %s, k=%d, C=%d -> %s",
                        len(parts), len(todo), sconf["index"], sconf["k"],
                        sconf["candidates"], out)
        if todo:
            searcher = make_searcher(sconf, ref_store, root / references.name, features_name)
            for k in tqdm(todo, desc="local search", unit="shard"):
                search_shard(k, query_store, ref_store, searcher, sconf, parts[k])
        rows = [[r[c] for c in COLUMNS] for p in parts for r in read_csv(p)]
        candidates = write_csv(out / "candidates.csv", COLUMNS, rows)
        run.logger.info("%d candidate rows for %d query views", len(rows),
                        len({(r[0], r[1]) for r in rows}))
    return candidates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_set_args(parser)
    cli.add_common_args(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_main(main, cli.config_from_args(args), args.queries, args.references, args.work)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from local_fea import search

    search.run_cli()
