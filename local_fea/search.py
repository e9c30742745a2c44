"""Stage: local descriptor search, giving each query view its top-C candidate references.

    copydet search --queries <query feature store> --references <reference feature store>

Every query descriptor takes its k nearest reference descriptors; each neighbour votes for
its reference image with weight ``max(0, 1 - d_i / d_k)`` (squared L2 distances): a soft
ratio test in which a neighbour no closer than the k-th counts nothing, and a reference
counts once per query descriptor. Votes are summed per (query view, reference) in sparse
form; each query view keeps its C best references. Each query shard is one task of the
execution layer (in this process, Faiss using ``run.n_jobs`` threads; or spread over the
workers of a Dask cluster, each reading the index once) and writes its part atomically,
named after the reference store's revision, so a restarted run resumes and a reference set
that gained or lost images is searched again. With GPUs the search runs in this process on
all of them.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from common import cli
from common.config import digest, file_digest, output_name
from common.io import read_csv, write_csv
from common.logs import start_run
from common.parallel import dask_client, parallel_map, resolve_n_jobs
from common.shards import ShardStore
from local_fea.index import (
    EXACT,
    ExactSearch,
    IndexSearch,
    ReferenceIndex,
    block_rows,
    concrete_index,
    decode_images,
    load_index,
    removed_ids,
    trained_index_path,
    use_gpu,
)

STAGE = "local_search"
COLUMNS = ["query_id", "view", "reference_id", "votes", "rank"]
NOT_IN_NAME = ("block_mb", "gpu_block_mb", "query_batch")  # resources, not results


def resolved(conf: dict[str, Any], references: ShardStore) -> dict[str, Any]:
    """``conf`` with ``local_search.index: auto`` made concrete for ``references``."""
    return {**conf, STAGE: concrete_index(conf[STAGE], len(references))}


def search_root(conf: dict[str, Any], features_name: str, work_dir: str | Path) -> Path:
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    return Path(work_dir) / STAGE / output_name(section, features_name)


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
    # one int64 key per (unit, reference): a 1-D unique sorts ~15x faster than rows
    if len(units) and (int(np.max(units)) >= 2**31 or int(refs.max(initial=0)) >= 2**32):
        raise ValueError("vote: query views must number < 2^31 and references < 2^32")
    keys = (np.repeat(np.asarray(units, np.int64), refs.shape[1])[keep] << 32) | refs.ravel()[keep]
    pairs, inverse = np.unique(keys, return_inverse=True)
    votes = np.bincount(inverse.ravel(), weights=weight.ravel()[keep], minlength=len(pairs))
    pair_units, pair_refs = pairs >> 32, pairs & 0xFFFFFFFF
    order = np.lexsort((pair_refs, -votes, pair_units))
    sorted_units = pair_units[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_units)) + 1]  # each unit's best pair
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    top = rank < candidates
    return list(zip(sorted_units[top].tolist(), pair_refs[order][top].tolist(),
                    votes[order][top].tolist(), rank[top].tolist(), strict=True))


def query_block(store: ShardStore, k: int) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Query views of shard ``k``: their (id, view) names, descriptor owners, descriptors."""
    shard = store.load(k)
    names, owners, descs = [], [], []
    for view, packed in shard["views"].items():
        offsets = packed["desc"]["offsets"]
        for row, image_id in enumerate(shard["ids"]):
            n = offsets[row + 1] - offsets[row]
            if n and not store.is_removed(image_id):
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


def open_searcher(conf: dict[str, Any], references: ShardStore, index_path: Path | None):
    """A function descriptors -> (squared distances, ids) over ``references``: the populated
    index at ``index_path``, or exact search (None). The caller holds it while it searches;
    dropping it frees the index or the resident references (host or GPU memory)."""
    if index_path is None:
        gpu = use_gpu(conf)
        return ExactSearch(references, conf["k"], gpu, block_rows(conf, gpu),
                           conf["query_batch"])
    return IndexSearch(load_index(index_path, conf["nprobe"]), conf["k"], conf["nprobe"],
                       removed_ids(references), conf["query_batch"])


def search_part(k: int, conf: dict[str, Any], queries: str, references: str,
                index_path: str | None, parts: str, shared: str) -> int:
    """A task on a Dask worker: search query shard ``k`` and write its part; return its
    number of rows. The worker's threads share one reference store and searcher (read once
    per worker, dropped when the stage ends: ``common.dask_resources``, block ``shared``)."""
    from common.dask_resources import worker_resource

    faiss.omp_set_num_threads(1)
    index = None if index_path is None else Path(index_path)
    ref_store, searcher = worker_resource(  # one stage call per block: one searcher
        shared, "searcher", lambda: (store := ShardStore(references),
                                     open_searcher(conf, store, index)))
    query_store = ShardStore(queries)
    out = part_path(Path(parts), k, query_store, ref_store)
    return search_shard(k, query_store, ref_store, searcher, conf, out)


def part_path(parts: Path, k: int, queries: ShardStore, references: ShardStore) -> Path:
    """Query shard ``k``'s part, named after what it was searched in (the reference store's
    revision, the removed queries of the shard)."""
    removed = sorted(i for i in queries.shards[k] if queries.is_removed(i))
    return parts / f"part_{k:05d}-{digest(references.revision, removed)}.csv"


def candidates_path(conf: dict[str, Any], queries: Path, references: Path,
                    work_dir: str | Path) -> Path:
    """Where the candidates of two feature stores go (``<q store>-vs-<r store>/``)."""
    root = search_root(conf, references.parent.name, work_dir)
    return root / f"{queries.name}-vs-{references.name}" / "candidates.csv"


def index_folder(conf: dict[str, Any], references: Path, work_dir: str | Path) -> Path:
    """Where the populated index of a reference store lives: keyed by what its content
    depends on (factory string, trained index file, features), not by search settings such
    as ``nprobe``, so changing those never re-encodes the references."""
    features_name = references.parent.name
    trained = trained_index_path(conf[STAGE], features_name)
    section = {"name": "{index}", "index": conf[STAGE]["index"]}
    name = output_name(section, features_name, file_digest(trained))
    return Path(work_dir) / "local_index" / name / references.name


def main(conf: dict[str, Any], queries: Path, references: Path, work_dir: str | Path) -> Path:
    """Search every query view of the query feature store in the reference feature store
    (both as ``local_fea.extract`` returned them); return ``candidates.csv``."""
    query_store, ref_store = ShardStore(queries), ShardStore(references)
    conf = resolved(conf, ref_store)
    out = candidates_path(conf, query_store.root, ref_store.root, work_dir).parent
    sconf = conf[STAGE]
    run = start_run(work_dir, f"{STAGE}-{out.name}")
    with run:
        threads = resolve_n_jobs(conf["run"]["n_jobs"])
        faiss.omp_set_num_threads(threads)
        parts = [part_path(out / "parts", k, query_store, ref_store)
                 for k in range(len(query_store.shards))]
        todo = [k for k, p in enumerate(parts) if not p.exists()]
        gpu = use_gpu(sconf)
        run.logger.info("%d query shard(s), %d to search, index %s%s, k=%d, C=%d, %d of %d "
                        "references removed -> %s", len(parts), len(todo), sconf["index"],
                        " (exact on GPUs)" if gpu else "", sconf["k"], sconf["candidates"],
                        len(ref_store.removed), len(ref_store), out)
        index_path = None
        if todo and sconf["index"] != EXACT and not gpu:
            index_path = ReferenceIndex(index_folder(conf, ref_store.root, work_dir), sconf,
                                        ref_store.root.parent.name).update(ref_store)
        client = dask_client()
        if client is None or gpu:  # here, with Faiss threads or on every GPU of this node
            searcher = open_searcher(sconf, ref_store, index_path) if todo else None
            for k in tqdm(todo, desc="local search" + " (GPU)" * gpu, unit="shard"):
                search_shard(k, query_store, ref_store, searcher, sconf, parts[k])
            del searcher
        else:  # one task per query shard, spread over the Dask workers' threads
            from common.dask_resources import shared_on_workers

            with shared_on_workers(client) as shared:
                task = functools.partial(
                    search_part, conf=sconf, queries=str(query_store.root),
                    references=str(ref_store.root),
                    index_path=None if index_path is None else str(index_path),
                    parts=str(out / "parts"), shared=shared)
                for _ in parallel_map(task, todo, desc="local search", unit="shard"):
                    pass
        for stale in set((out / "parts").glob("part_*.csv")) - set(parts):
            stale.unlink()
        rows = [[r[c] for c in COLUMNS] for p in parts for r in read_csv(p)]
        candidates = write_csv(out / "candidates.csv", COLUMNS, rows)
        run.logger.info("%d candidate rows for %d query views", len(rows),
                        len({(r[0], r[1]) for r in rows}))
    return candidates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, type=Path,
                        help="query feature store (what `copydet extract --mirror` printed)")
    parser.add_argument("--references", required=True, type=Path,
                        help="reference feature store (what `copydet extract` printed)")


COMMAND = cli.Command("search", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.queries, a.references, a.work))

if __name__ == "__main__":
    cli.run_module("local_fea.search")
