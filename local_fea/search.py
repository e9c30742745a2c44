"""Stage: local descriptor search, giving each query view its top-C candidate references.

    copydet search --queries <query feature store> --references <reference feature store>

Every query descriptor takes its k nearest reference descriptors; each neighbour votes for
its reference image with weight ``max(0, 1 - d_i / d_k)`` (squared L2 distances): a soft
ratio test in which a neighbour no closer than the k-th counts nothing, and a reference
counts once per query descriptor. Votes are summed per (query view, reference) in sparse
form; each query view keeps its C best references. Each query shard is one task of the
execution layer (in this process, Faiss using ``run.n_jobs`` threads; or spread over the
workers of a Dask cluster, each reading the index once; an index in several parts is read
once per task, so a task then takes a group of shards) and writes its part atomically, named
after the reference store's revision, so a restarted run resumes and a reference set
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
from common.parallel import dask_client, parallel_map, resolve_n_jobs, spread
from common.shards import ShardStore
from local_fea.index import (
    EXACT,
    ExactSearch,
    IndexSearch,
    PartedSearch,
    ReferenceIndex,
    block_rows,
    concrete_index,
    decode_images,
    load_index,
    load_trained,
    removed_ids,
    trained_index_path,
    use_gpu,
)

STAGE = "local_search"
COLUMNS = ["query_id", "view", "reference_id", "votes", "rank"]
NOT_IN_NAME = ("block_mb", "gpu_block_mb", "query_batch", "index_part_mb")  # resources


def resolved(conf: dict[str, Any], references: ShardStore) -> dict[str, Any]:
    """``conf`` with ``local_search.index: auto`` made concrete for ``references``."""
    return {**conf, STAGE: concrete_index(conf[STAGE], len(references))}


def search_root(conf: dict[str, Any], features_name: str, work_dir: str | Path) -> Path:
    section = {k: v for k, v in conf[STAGE].items() if k not in NOT_IN_NAME}
    return Path(work_dir) / STAGE / output_name(section, features_name)


def vote(
    units: np.ndarray, dist: np.ndarray, ids: np.ndarray, candidates: int,
    own: np.ndarray | None = None,
) -> list[tuple[int, int, float, int]]:
    """Top-``candidates`` (unit, reference number, votes, rank) from k-NN results.

    ``units[i]`` is the query view that descriptor ``i`` belongs to; ``own[u]``, where given,
    the reference number of unit ``u``'s own image (or -1), which gets no votes: the
    neighbours a descriptor finds in its own image take no candidate's place.
    """
    refs = decode_images(ids)
    dist = np.where(refs >= 0, dist, -np.inf)
    far = dist.max(axis=1, keepdims=True)  # the k-th (last found) neighbour's distance
    weight = np.where(far > 0, np.clip(1.0 - dist / np.where(far > 0, far, 1), 0, 1), 0)
    if own is not None:
        refs = np.where(refs == own[units][:, None], -1, refs)
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


def search_shards(ks: list[int], queries: ShardStore, references: ShardStore, searcher,
                  conf: dict[str, Any], outs: list[Path]) -> int:
    """Search query shards ``ks`` in one call of the searcher and write each one's candidates
    to its file in ``outs``; return the number of rows."""
    blocks = [query_block(queries, k) for k in ks]
    names = [name for block in blocks for name in block[0]]
    first = np.cumsum([0] + [len(block[0]) for block in blocks])
    rows: list[list[tuple]] = [[] for _ in ks]
    if names:
        owners = np.concatenate([b[1] + f for b, f in zip(blocks, first[:-1], strict=True)])
        dist, ids = searcher(np.concatenate([block[2] for block in blocks]))
        shard_of = np.searchsorted(first, np.arange(len(names)), side="right") - 1
        own = np.array([references.number(i) if i in references else -1 for i, _ in names],
                       np.int64) if conf["skip_same_id"] else None
        for unit, ref, votes, rank in vote(owners, dist, ids, conf["candidates"], own):
            image_id, view = names[unit]
            rows[shard_of[unit]].append((image_id, view, references.id_of(ref),
                                         f"{votes:.4f}", rank))
    for part, out in zip(rows, outs, strict=True):
        part.sort(key=lambda r: (r[0], r[1], r[4]))
        write_csv(out, COLUMNS, part)
    return sum(map(len, rows))


def query_groups(store: ShardStore, todo: list[int], parted: bool, part_mb: float,
                 min_groups: int = 1) -> list[list[int]]:
    """The query shards of each searcher call: one each; for an index in parts (every call
    reads every part), as many as hold a quarter of a part's bytes of float32 descriptors,
    in at least ``min_groups`` groups (a cluster's workers) where there are shards enough."""
    if not parted:
        return [[k] for k in todo]
    sizes = [sum(int(v["desc"]["offsets"][-1]) for v in store.load(k)["views"].values())
             for k in todo]
    budget = min(part_mb * 2**20 / 4 / (4 * 128), sum(sizes) / max(1, min_groups))
    groups: list[list[int]] = []
    held = 0
    for k, n in zip(todo, sizes, strict=True):
        if not groups or held + n > budget:
            groups.append([])
            held = 0
        groups[-1].append(k)
        held += n
    if len(groups) < min(min_groups, len(todo)):  # uneven shards: split by count instead
        groups = spread(todo, min_groups)
    return groups


def open_searcher(conf: dict[str, Any], references: ShardStore, index_parts: list[Path] | None):
    """A function descriptors -> (squared distances, ids) over ``references``: the populated
    index (one part, kept in memory; several, read one at a time), or exact search (None).
    The caller holds it while it searches; dropping it frees the index or the resident
    references (host or GPU memory)."""
    if index_parts is None:
        gpu = use_gpu(conf)
        return ExactSearch(references, conf["k"], gpu, block_rows(conf, gpu),
                           conf["query_batch"])
    exclude = removed_ids(references)
    if len(index_parts) > 1:
        return PartedSearch(index_parts, load_trained(conf, references.root.parent.name),
                            conf["k"], conf["nprobe"], exclude, conf["query_batch"])
    return IndexSearch(load_index(index_parts[0], conf["nprobe"]), conf["k"], conf["nprobe"],
                       exclude, conf["query_batch"])


def search_part(ks: list[int], conf: dict[str, Any], queries: str, references: str,
                index_parts: list[str] | None, parts: str, shared: str) -> int:
    """A task on a Dask worker: search query shards ``ks`` and write their parts; return their
    number of rows. The worker's threads share one reference store and searcher (read once
    per worker, dropped when the stage ends: ``common.dask_resources``, block ``shared``)."""
    from common.dask_resources import worker_resource

    faiss.omp_set_num_threads(1)
    index = None if index_parts is None else [Path(p) for p in index_parts]
    ref_store, searcher = worker_resource(  # one stage call per block: one searcher
        shared, "searcher", lambda: (store := ShardStore(references),
                                     open_searcher(conf, store, index)))
    query_store = ShardStore(queries)
    outs = [part_path(Path(parts), k, query_store, ref_store) for k in ks]
    return search_shards(ks, query_store, ref_store, searcher, conf, outs)


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
        index_parts = None
        if todo and sconf["index"] != EXACT and not gpu:
            index_parts = ReferenceIndex(index_folder(conf, ref_store.root, work_dir), sconf,
                                         ref_store.root.parent.name).update(ref_store)
        client = dask_client()
        groups = query_groups(query_store, todo, len(index_parts or ()) > 1,
                              sconf["index_part_mb"],
                              1 if client is None else len(client.nthreads()))  # workers: a
        # worker's threads share one searcher and take turns on an index in parts
        if client is None or gpu:  # here, with Faiss threads or on every GPU of this node
            searcher = open_searcher(sconf, ref_store, index_parts) if todo else None
            with tqdm(total=len(todo), desc="local search" + " (GPU)" * gpu,
                      unit="shard") as bar:
                for group in groups:
                    search_shards(group, query_store, ref_store, searcher, sconf,
                                  [parts[k] for k in group])
                    bar.update(len(group))
            del searcher
        else:  # one task per group of query shards, spread over the Dask workers' threads
            from common.dask_resources import shared_on_workers

            with shared_on_workers(client) as shared:
                task = functools.partial(
                    search_part, conf=sconf, queries=str(query_store.root),
                    references=str(ref_store.root),
                    index_parts=None if index_parts is None else list(map(str, index_parts)),
                    parts=str(out / "parts"), shared=shared)
                for _ in parallel_map(task, groups, desc="local search", unit="group"):
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
