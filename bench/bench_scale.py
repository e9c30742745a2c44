"""Scaling benchmark: time and peak memory of the local search against the number of references,
the compressed indexes against exact search, and the per-shard costs of every stage.

    nice -n 10 python -m bench.bench_scale --work work            # everything (hours on 1 core)
    python -m bench.bench_scale --work work --factors 1 2 4 10      # a quicker curve

Reference sets of 1x, 2x, 4x, 10x and 100x the devset's 1,500 references: the devset's own
features plus synthetic distractor images. A synthetic image is a devset image whose
descriptors had their orientation bins rotated and their 4x4 grid flipped or rotated (one of
64 transforms per copy), were mixed 80/20 with another descriptor of the shard, noised and
put back on the RootSIFT sphere: new descriptors with SIFT's statistics, as far from each
other as descriptors of different real images are. Every measurement runs in a process of
its own on one thread (wall time of the measured call, peak RSS of the process), so numbers
are per core; the machine is shared, so compare ratios within one run.

Needs the devset features (``make all`` on ../shared/devset, same ``--work``) and the training
photos' features (``make train-index`` extracts them). Results are cached in
``<work>/bench/scale/results.json`` (a rerun measures only what is missing); writes
``docs/scale_bench.md`` (tables) and ``docs/scale_bench.png`` (curves).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.memory import measure
from common import safe_pickle
from common.config import REPO_ROOT, load_config
from common.images import list_images
from common.io import dump_joblib, write_json, write_text
from common.parallel import parallel_map
from common.shards import ShardStore
from local_fea.extract import store_path

DEVSET = REPO_ROOT.parent / "shared" / "devset"
TRAIN_PHOTOS = REPO_ROOT.parent / "shared" / "trainset" / "photos"
DOCS = REPO_ROOT / "docs"
K, C = 10, 5


SEARCH = load_config()["local_search"]


def tag(factory: str) -> str:
    """A factory string as a results key or folder name."""
    return factory.replace(",", "_")


def default_index(n_references: int) -> tuple[str, int]:
    """The configured index (``auto``: the one it picks) and nprobe for ``n_references``."""
    from local_fea.index import concrete_index

    section = concrete_index(SEARCH, n_references)
    return section["index"], section["nprobe"]


DEFAULT, DEFAULT_NPROBE = default_index(1500)  # the devset's
CURVE, CURVE_NPROBE = default_index(10**9)  # the curve's: the index auto uses at scale
# (factory string, nprobe): the shipped default first
COMPARED = [(DEFAULT, DEFAULT_NPROBE), ("IVF1024,PQ64x4fs", 4), ("IVF1024,PQ64x4fs", 6),
            ("IVF4096,PQ64x4fs", 8), ("IVF4096,PQ64x4fs", 16), ("IVF4096,PQ64x4fs", 32),
            ("IVF4096,PQ32x4fs", 16), ("IVF4096,SQ8", 16), ("IVF4096_HNSW32,PQ64x4fs", 16)]
# IVF16384,PQ64x4fs at nprobe 64 (measured 2026-11: 0.641 of exact's top-5 at 24x exact's
# speed) is left out: its k-means takes a quarter of an hour on one core
COMPARED = list(dict.fromkeys(COMPARED))


# ---------------------------------------------------------------- synthetic references

def _dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 rotations/flips of the 4x4 spatial grid of SIFT descriptors (n,4,4,8)."""
    g = np.rot90(grid, t % 4, axes=(1, 2))
    return g.transpose(0, 2, 1, 3) if t >= 4 else g


def synthetic_shard(task: tuple[str, int, str]) -> str:
    """Write copy ``c`` of a devset shard as a shard of new (distractor) images."""
    base, c, out = task
    if Path(out).exists():
        return out
    shard = safe_pickle.load(base, mmap_mode="r")
    packed = shard["views"]["orig"]["desc"]
    rng = np.random.default_rng(c * 100_003 + int(Path(base).stem.split("_")[1]))
    grid = np.asarray(packed["data"], np.float32).reshape(-1, 4, 4, 8)
    t = _dihedral(np.roll(grid, c % 8, axis=3), (c // 8) % 8).reshape(-1, 128)
    mixed = 0.8 * t + 0.2 * t[rng.permutation(len(t))] + rng.normal(0, 6, t.shape)
    mixed = np.clip(mixed, 0, None)
    mixed *= 512.0 / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-6)
    desc = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    ids = [f"X{c:03d}-{i}" for i in shard["ids"]]
    dump_joblib({"ids": ids, "status": [""] * len(ids),
                 "views": {"orig": {"desc": {"data": desc,
                                             "offsets": np.asarray(packed["offsets"])}}}}, out)
    return out


def scaled_store(devset_refs: ShardStore, factor: int, root: Path) -> ShardStore:
    """The devset references plus ``factor - 1`` synthetic copies, as a shard store whose
    shard files link into a shared pool (the 100x store contains the 10x one...)."""
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    n = len(devset_refs.shards)
    tasks = [(str(devset_refs.shard_path(k)), c, str(pool / f"shard_{c * n + k:05d}.pkl"))
             for c in range(1, factor) for k in range(n)]
    todo = [t for t in tasks if not Path(t[2]).exists()]
    for _ in parallel_map(synthetic_shard, todo, n_jobs=2, desc=f"synthetic x{factor}",
                          unit="shard"):
        pass
    store = root / f"refs-x{factor}"
    store.mkdir(exist_ok=True)
    shards = []
    for c in range(factor):
        for k, ids in enumerate(devset_refs.shards):
            j = c * n + k
            src = devset_refs.shard_path(k) if c == 0 else pool / f"shard_{j:05d}.pkl"
            link = store / f"shard_{j:05d}.pkl"
            if not link.exists():
                link.symlink_to(src)
            shards.append(list(ids) if c == 0 else [f"X{c:03d}-{i}" for i in ids])
    write_json(store / "manifest.json", {"set": store.name, "source": "synthetic",
                                         "shard_size": devset_refs.shard_size,
                                         "shards": shards, "paths": {}})
    return ShardStore(store)


# ---------------------------------------------------------------- measured points (subprocess)

def _queries(store: ShardStore, ids: list[str] | None):
    """(names, owners, float32 descriptors) of the query views of ``ids`` (all if None)."""
    from local_fea.search import query_block

    names, owners, descs = [], [], []
    for k in range(len(store.shards)):
        n, o, d = query_block(store, k)
        keep = [u for u, (i, _) in enumerate(n) if ids is None or i in ids]
        mask = np.isin(o, keep)
        remap = {u: len(names) + j for j, u in enumerate(keep)}
        names += [n[u] for u in keep]
        owners.append(np.array([remap[u] for u in o[mask]], np.int64))
        descs.append(d[mask])
    return names, np.concatenate(owners), np.concatenate(descs)


def _candidates(names, owners, dist, ids, refs: ShardStore) -> list[list[str]]:
    from local_fea.search import vote

    return [[*names[u], refs.id_of(r)] for u, r, _, _ in vote(owners, dist, ids, C)]


def point(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process; returns what the driver records."""
    import faiss

    from common.parallel import limit_threads

    limit_threads()
    faiss.omp_set_num_threads(1)
    kind = spec["kind"]
    if kind in ("exact", "ivf-search"):
        from local_fea.index import (
            ExactSearch,
            IndexSearch,
            block_rows,
            load_index,
            removed_ids,
        )

        refs = ShardStore(spec["refs"])
        names, owners, desc = _queries(ShardStore(spec["queries"]), spec.get("query_ids"))
        if kind == "exact":
            searcher = ExactSearch(refs, K, False, block_rows({"block_mb": spec["block_mb"]},
                                                              False))
        else:
            index = load_index(spec["index"], spec["nprobe"])
            if "HNSW" in spec.get("factory", ""):
                quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
                quantizer.hnsw.efSearch = max(128, 2 * spec["nprobe"])
            searcher = IndexSearch(index, K, spec["nprobe"], removed_ids(refs))
        start = time.perf_counter()
        dist, ids = searcher(desc)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "query_desc": len(desc), "ref_images": len(refs),
                "candidates": _candidates(names, owners, dist, ids, refs)}
    if kind == "ivf-build":
        from local_fea.index import ReferenceIndex, trained_index_path

        refs = ShardStore(spec["refs"])
        conf = {**load_config()["local_search"], "index": spec["factory"],
                "trained_dir": spec["trained_dir"]}
        folder = Path(spec["out"])
        start = time.perf_counter()
        path = ReferenceIndex(folder, conf, spec["features"]).update(refs)
        seconds = time.perf_counter() - start
        index = faiss.read_index(str(path))
        return {"seconds": seconds, "ntotal": int(index.ntotal), "bytes": path.stat().st_size,
                "trained_bytes": trained_index_path(conf, spec["features"]).stat().st_size,
                "ref_images": len(refs), "index": str(path)}
    if kind == "stages":
        return stage_costs(spec)
    raise ValueError(kind)


def stage_costs(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per image of extraction (references; queries with their mirror view), per
    candidate pair of verification, and bytes per image of the feature stores (one core)."""
    from common.images import list_images
    from common.shards import ShardTask
    from local_fea.extract import extract_shard
    from match_score.verify import ChunkVerifier, candidate_pairs

    conf = load_config()
    out = Path(spec["tmp"])
    result = {}
    for name, folder, mirror in (("extract_reference", DEVSET / "references", False),
                                 ("extract_query", DEVSET / "queries", True)):
        images = list_images(folder)
        n = spec["images"]
        task = ShardTask(0, tuple(images.ids[:n]), tuple(map(str, images.paths[:n])),
                         out / f"{name}.pkl")
        start = time.perf_counter()
        extract_shard(task, conf["local_fea"], mirror)
        result[f"{name}_s_per_image"] = (time.perf_counter() - start) / n
    pairs = candidate_pairs(Path(spec["candidates"]))[:spec["pairs"]]
    start = time.perf_counter()
    ChunkVerifier(spec["queries"], spec["refs"], conf["match_score"],
                  conf["local_fea"]["short_side"], out)([(0, pairs)])
    result["verify_s_per_pair"] = (time.perf_counter() - start) / len(pairs)
    for name, root in (("reference", spec["refs"]), ("query", spec["queries"])):
        store = ShardStore(root)
        size = sum(store.shard_path(k).stat().st_size for k in range(len(store.shards)))
        desc = sum(len(store.load(k)["views"]["orig"]["desc"]["data"])
                   for k in range(len(store.shards)))
        result[f"{name}_bytes_per_image"] = size / len(store)
        result[f"{name}_desc_per_image"] = desc / len(store)
    return result


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``point(spec)`` in a child process; add its wall time and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.bench_scale", "--point", json.dumps(spec)]
    measured = measure(cmd, cwd=REPO_ROOT, env=env)
    if measured.returncode:
        raise RuntimeError(f"point {spec['kind']} failed ({measured.returncode})")
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    result.update(process_s=measured.seconds, peak_rss_mb=measured.peak_rss_mb)
    return result


# ---------------------------------------------------------------- driver

class Results:
    """Measurements cached in a JSON file, so that a rerun only measures what is missing."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, spec: dict[str, Any], fn=run_point) -> dict[str, Any]:
        if key not in self.data:
            print(f"measuring {key} ...", file=sys.stderr, flush=True)
            self.data[key] = fn(spec)
            write_json(self.path, self.data)
            print(f"  {key}: {self.data[key].get('seconds', 0):.1f} s, "
                  f"{self.data[key].get('peak_rss_mb', 0):.0f} MB", file=sys.stderr)
        return self.data[key]


def agreement(exact: list[list[str]], approx: list[list[str]]) -> float:
    """Fraction of the exact top-C (query view, reference) candidates the index recovers."""
    truth = {tuple(r) for r in exact}
    return len(truth & {tuple(r) for r in approx}) / max(1, len(truth))


def gt_recall(candidates: list[list[str]], gt: dict[str, str], queries: set[str]) -> float:
    """Fraction of the true copy pairs (of ``queries``) among the candidates (either view)."""
    found = {(q, r) for q, _, r in candidates}
    truth = [(q, r) for q, r in gt.items() if r and q in queries]
    return sum(p in found for p in truth) / max(1, len(truth))


def shipped_index(factory: str, features: str) -> bool:
    """Whether a trained index of ``factory`` ships in the trained-index folder."""
    from local_fea.index import trained_index_path

    return trained_index_path({**SEARCH, "index": factory}, features).exists()


def train_variants(features: str, training: ShardStore, trained_dir: Path) -> None:
    """Trained, empty indexes of ``COMPARED`` that are not shipped (coarse quantisers trained
    once per nlist, on training photos only; an nlist that a shipped index has reuses its
    quantiser)."""
    import faiss

    from local_fea.index import trained_index_path, write_index
    from local_fea.train_index import sample_descriptors

    conf = SEARCH
    todo = [f for f in dict.fromkeys(f for f, _ in COMPARED) if not shipped_index(f, features)
            and not trained_index_path({**conf, "index": f, "trained_dir": trained_dir},
                                       features).exists()]
    if not todo:
        return
    faiss.omp_set_num_threads(1)
    x = sample_descriptors(training, 1_000_000)
    centroids = {}
    for factory in dict.fromkeys(f for f, _ in COMPARED):
        if shipped_index(factory, features):
            shipped = faiss.read_index(str(trained_index_path({**conf, "index": factory},
                                                              features)))
            ivf = faiss.extract_index_ivf(shipped)  # a view into ``shipped``: keep it alive
            centroids[ivf.nlist] = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    for factory in todo:
        nlist = int(factory.split(",")[0].split("_")[0][3:])
        if nlist not in centroids:
            print(f"k-means {nlist} on {len(x)} training descriptors ...", file=sys.stderr)
            kmeans = faiss.Kmeans(128, nlist, niter=10, seed=1234, max_points_per_centroid=256)
            kmeans.train(x)
            centroids[nlist] = kmeans.centroids
        index = faiss.index_factory(128, factory)
        faiss.extract_index_ivf(index).quantizer.add(centroids[nlist])
        index.train(x)  # the quantiser is complete: only the codec is trained
        write_index(index, trained_index_path({**conf, "index": factory,
                                               "trained_dir": trained_dir}, features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 10, 100])
    parser.add_argument("--block-mb", type=int, default=256,
                        help="exact search block (smaller than the 1x set: it streams)")
    parser.add_argument("--agreement-factors", type=int, nargs="*", default=[1, 10])
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the comparison of compressed indexes on the devset")
    parser.add_argument("--train-photos", type=Path, default=TRAIN_PHOTOS,
                        help="the photos `make train-index` extracted")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(json.loads(args.point))))
        return

    conf, work = load_config(), args.work.resolve()
    devset_refs = ShardStore(store_path(conf, list_images(DEVSET / "references"), work, False))
    queries = store_path(conf, list_images(DEVSET / "queries"), work, True)
    training = ShardStore(store_path(conf, list_images(args.train_photos), work, False))
    features = devset_refs.root.parent.name
    root = work / "bench" / "scale"
    results = Results(root / "results.json")
    with open(DEVSET / "gt.csv") as f:
        gt = {r["query_id"]: r["reference_id"] for r in csv.DictReader(f)}
    copies = sorted(q for q, r in gt.items() if r)
    names, owners, _ = _queries(ShardStore(queries), copies)
    per_query = np.bincount(owners, minlength=len(names))
    cumulative = np.cumsum([sum(n for (q, _), n in zip(names, per_query, strict=True)
                                if q == c) for c in copies])
    # the curve's queries: the first copies with >= 2,000 descriptors (enough for BLAS)
    q2, q16 = copies[:int(np.searchsorted(cumulative, 2000)) + 1], copies[:16]
    q200 = sorted(copies + sorted(q for q, r in gt.items() if not r)[:50])
    shipped_dir = str(REPO_ROOT / conf["local_search"]["trained_dir"])

    stores = {f: scaled_store(devset_refs, f, root) for f in sorted(args.factors)}
    for f, store in stores.items():  # the curve: exact streamed vs the shipped IVF index
        results.get(f"exact-curve-x{f}", {"kind": "exact", "refs": str(store.root),
                                       "queries": str(queries), "query_ids": q2,
                                       "block_mb": args.block_mb})
        build = results.get(f"ivf-build-x{f}", {
            "kind": "ivf-build", "refs": str(store.root), "factory": CURVE,
            "trained_dir": shipped_dir, "features": features,
            "out": str(root / "index" / f"x{f}")})
        results.get(f"ivf-search-x{f}", {"kind": "ivf-search", "refs": str(store.root),
                                         "queries": str(queries), "index": build["index"],
                                         "nprobe": CURVE_NPROBE, "factory": CURVE})
        if f in args.agreement_factors:
            results.get(f"exact-q16-x{f}", {"kind": "exact", "refs": str(store.root),
                                            "queries": str(queries), "query_ids": q16,
                                            "block_mb": args.block_mb})
            factory, nprobe = default_index(len(store))
            if (factory, nprobe) != (CURVE, CURVE_NPROBE):  # what auto uses at this size
                build = results.get(f"auto-build-{tag(factory)}-x{f}", {
                    "kind": "ivf-build", "refs": str(store.root), "factory": factory,
                    "trained_dir": shipped_dir, "features": features,
                    "out": str(root / "index" / f"x{f}-{tag(factory)}")})
                results.get(auto_key(factory, nprobe, f), {
                    "kind": "ivf-search", "refs": str(store.root), "queries": str(queries),
                    "query_ids": q16, "index": build["index"], "nprobe": nprobe,
                    "factory": factory})

    # compressed indexes against exact search, on the devset (200 queries)
    trained_dir = root / "trained"
    compared = [] if args.no_compare else COMPARED
    if compared:
        results.get("exact-q200-x1", {"kind": "exact", "refs": str(devset_refs.root),
                                      "queries": str(queries), "query_ids": q200,
                                      "block_mb": args.block_mb})
        train_variants(features, training, trained_dir)
    for factory, nprobe in compared:
        tdir = shipped_dir if shipped_index(factory, features) else str(trained_dir)
        name = tag(factory)
        build = results.get(f"cmp-build-{name}", {
            "kind": "ivf-build", "refs": str(devset_refs.root), "factory": factory,
            "trained_dir": tdir, "features": features, "out": str(root / "cmp" / name)})
        results.get(f"cmp-search-{name}-np{nprobe}", {
            "kind": "ivf-search", "refs": str(devset_refs.root), "queries": str(queries),
            "query_ids": q200, "index": build["index"], "nprobe": nprobe, "factory": factory})

    candidates = next((work / "local_search").glob(
        f"*/{Path(queries).name}-vs-{devset_refs.root.name}/candidates.csv"), None)
    if candidates is not None:
        results.get("stages", {"kind": "stages", "tmp": str(root / "stages"), "images": 64,
                               "pairs": 200, "candidates": str(candidates),
                               "refs": str(devset_refs.root), "queries": str(queries)})
    report(results.data, sorted(args.factors), gt, q2, q16, q200, args.block_mb)


# ---------------------------------------------------------------- report

def _per_desc(build: dict[str, Any]) -> float:
    """Bytes an index adds per descriptor: (populated file - trained empty file) / count."""
    trained = build.get("trained_bytes")
    if trained is None:  # measured before trained_bytes was recorded: the shipped index
        trained = next((REPO_ROOT / "local_fea" / "assets").glob("*.faiss")).stat().st_size
    return (build["bytes"] - trained) / build["ntotal"]


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def auto_key(factory: str, nprobe: int, factor: int) -> str:
    """Results key of the search with ``auto``'s own index at ``factor`` (the 16 copies)."""
    return f"auto-search-{tag(factory)}-np{nprobe}-x{factor}"


def auto_searches(data: dict[str, Any], factor: int) -> list[tuple[str, str]]:
    """(index label, results key) of the search with the index ``auto`` picks at ``factor``
    when it is not the curve's."""
    factory, nprobe = default_index(data[f"exact-q16-x{factor}"]["ref_images"])
    if (factory, nprobe) == (CURVE, CURVE_NPROBE):
        return []
    return [(f"`{factory}`, {nprobe} (`auto`)", auto_key(factory, nprobe, factor))]


def report(data: dict[str, Any], factors: list[int], gt: dict[str, str], q2: list[str],
           q16: list[str], q200: list[str], block_mb: int) -> None:
    lines = ["# Scaling benchmark (`python -m bench.bench_scale`)", "",
             "Generated by `bench/bench_scale.py` on the devset (1,500 references; larger "
             "sets add synthetic distractor images, see the script). One core per "
             "measurement, each in its own process; peak RSS of that process. The machine "
             "is shared: read ratios, not absolute seconds.", "",
             "## Local search against the number of references", "",
             f"Exact search streams reference blocks of {block_mb} MB (float32) through "
             f"`IndexFlatL2` into result heaps ({len(q2)} copy queries, both views); the IVF "
             f"index is `{CURVE}` (nprobe {CURVE_NPROBE}), the one `local_search.index: "
             "auto` uses beyond 15,000 references, built by "
             "`ReferenceIndex.update` and searched with all 400 devset queries.", "",
             "| references | ref. descriptors | exact search s | µs per (query desc × M "
             "ref desc) | time vs first row | peak RSS MB |", "|---|---|---|---|---|---|"]
    curve = [(f, data.get(f"exact-curve-x{f}"), data.get(f"ivf-build-x{f}"),
              data.get(f"ivf-search-x{f}")) for f in factors]
    curve = [c for c in curve if all(c[1:])]
    for _, e, b, _ in curve:
        unit = e["seconds"] / (e["query_desc"] * b["ntotal"] / 1e6) * 1e6
        first = curve[0][1]["seconds"]
        lines.append(f"| {e['ref_images']:,} | {b['ntotal'] / 1e6:.1f} M | "
                     f"{_fmt(e['seconds'], 1)} | {_fmt(unit, 3)} | "
                     f"{e['seconds'] / first:.1f}× | {e['peak_rss_mb']:.0f} |")
    lines += ["", "| references | IVF build s | µs per added desc | index MB (bytes per "
              "desc) | build peak RSS MB | search s (400 queries) | ms per query desc | "
              "search peak RSS MB | exact ÷ IVF time per query desc |",
              "|---|---|---|---|---|---|---|---|---|"]
    for _, e, b, s in curve:
        ratio = (e["seconds"] / e["query_desc"]) / (s["seconds"] / s["query_desc"])
        lines.append(f"| {b['ref_images']:,} | {_fmt(b['seconds'], 1)} | "
                     f"{_fmt(b['seconds'] / b['ntotal'] * 1e6, 1)} | "
                     f"{b['bytes'] / 2**20:.0f} ({_per_desc(b):.1f}) | "
                     f"{b['peak_rss_mb']:.0f} | {_fmt(s['seconds'], 1)} | "
                     f"{_fmt(s['seconds'] / s['query_desc'] * 1e3, 3)} | "
                     f"{s['peak_rss_mb']:.0f} | {_fmt(ratio, 0)} |")
    qset = set(q16)
    rows = [(f, index, data[key]) for f in factors if f"exact-q16-x{f}" in data
            for index, key in [(f"`{CURVE}`, {CURVE_NPROBE}", f"ivf-search-x{f}"),
                               *auto_searches(data, f)] if key in data]
    if rows:
        lines += ["", "Candidates of the IVF indexes against exact search at scale (16 copy "
                  "queries, both views): fraction of the exact top-5 candidates recovered, "
                  "and of the true copies found in the top-5 (exact / index). Each size has "
                  f"`{CURVE}` and, where `auto` picks another index at that size, that one.",
                  "", "| references | index, nprobe | recovers exact top-5 | true copies in "
                  "top-5: exact | index |", "|---|---|---|---|---|"]
        for f, index, s in rows:
            e = data[f"exact-q16-x{f}"]
            approx = [r for r in s["candidates"] if r[0] in qset]
            lines.append(f"| {e['ref_images']:,} | {index} | "
                         f"{agreement(e['candidates'], approx):.3f} | "
                         f"{gt_recall(e['candidates'], gt, qset):.3f} | "
                         f"{gt_recall(approx, gt, qset):.3f} |")

    exact = data.get("exact-q200-x1")
    if exact:
        qset = set(q200)
        lines += ["", "## Compressed indexes against exact search (devset, 200 queries: the "
                  "150 copies and 50 distractors)", "",
                  "Indexes trained on the training photos only (k-means once per nlist; an "
                  "nlist that ships reuses the shipped quantiser); 1,500 references, 0.80 M "
                  "descriptors. Bytes per descriptor: what the populated index adds per "
                  "descriptor (code, 8-byte id, list padding), the trained quantiser aside.",
                  "",
                  "| index | nprobe | recovers exact top-5 | true copies in top-5 | search s | "
                  "speed-up vs exact | bytes per descriptor | index build s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| Flat (exact, streamed) | - | 1.000 | "
                  f"{gt_recall(exact['candidates'], gt, qset):.3f} | "
                  f"{_fmt(exact['seconds'], 1)} | 1 | 512 (float32; uint8 in the store: 128) "
                  "| - |"]
        for factory, nprobe in COMPARED:
            name = tag(factory)
            b, s = data.get(f"cmp-build-{name}"), data.get(f"cmp-search-{name}-np{nprobe}")
            if not (b and s):
                continue
            shipped = " (default)" if (factory, nprobe) == (DEFAULT, DEFAULT_NPROBE) else ""
            lines.append(
                f"| `{factory}`{shipped} | {nprobe} | "
                f"{agreement(exact['candidates'], s['candidates']):.3f} | "
                f"{gt_recall(s['candidates'], gt, qset):.3f} | {_fmt(s['seconds'], 1)} | "
                f"{_fmt(exact['seconds'] / s['seconds'], 0)} | {_per_desc(b):.1f} | "
                f"{_fmt(b['seconds'], 1)} |")
    stages = data.get("stages")
    if stages:
        lines += ["", "## Per-image and per-pair costs of the stages (one core)", "",
                  "| cost | value |", "|---|---|",
                  f"| reference extraction, s per image | "
                  f"{stages['extract_reference_s_per_image']:.3f} |",
                  f"| query extraction (with mirror view), s per image | "
                  f"{stages['extract_query_s_per_image']:.3f} |",
                  f"| verification, s per candidate pair | "
                  f"{stages['verify_s_per_pair']:.4f} |",
                  f"| reference features, bytes per image (descriptors per image) | "
                  f"{stages['reference_bytes_per_image']:,.0f} "
                  f"({stages['reference_desc_per_image']:.0f}) |",
                  f"| query features, bytes per image (descriptors per view) | "
                  f"{stages['query_bytes_per_image']:,.0f} "
                  f"({stages['query_desc_per_image']:.0f}) |"]
    write_text(DOCS / "scale_bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if curve:
        plot(curve, DOCS / "scale_bench.png")


def plot(curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [(e["ref_images"], None, e, b, s) for _, e, b, s in curve]
    refs = np.array([c[0] for c in curve])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    exact_t = [c[2]["seconds"] / c[2]["query_desc"] * 1e3 for c in curve]
    build_t = [c[3]["seconds"] for c in curve]
    search_t = [c[4]["seconds"] / c[4]["query_desc"] * 1e3 for c in curve]
    left.loglog(refs, exact_t, "o-", label="exact streamed search, ms per query descriptor")
    left.loglog(refs, search_t, "s-", label="IVF4096,PQ64x4fs search, ms per query descriptor")
    left.loglog(refs, build_t, "^-", label="IVF index build (add), s")
    left.set_xlabel("reference images")
    left.set_title("time (one core)")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    right.semilogx(refs, [c[2]["peak_rss_mb"] for c in curve], "o-",
                   label="exact streamed search")
    right.semilogx(refs, [c[4]["peak_rss_mb"] for c in curve], "s-",
                   label="IVF search (index in memory)")
    right.semilogx(refs, [c[3]["bytes"] / 2**20 for c in curve], "^--",
                   label="IVF index file")
    right.set_xlabel("reference images")
    right.set_ylabel("MB")
    right.set_title("peak resident memory")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from bench import bench_scale

    bench_scale.main()
