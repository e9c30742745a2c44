"""Scaling benchmark: time and peak memory of the local search against the number of references,
the compressed indexes against exact search, and the per-shard costs of every stage.

    nice -n 10 python -m bench.bench_scale --work work            # everything (hours on 1 core)
    python -m bench.bench_scale --work work --factors 1 2 4 10      # a quicker curve

Reference sets of 1x, 2x, 10x and 67x the devset's 1,500 references (100,500 at 67x): the
devset's own features plus synthetic distractor images. A synthetic image is a devset image whose
descriptors had their orientation bins rotated and their 4x4 grid flipped or rotated (one of
64 transforms per copy), were mixed 80/20 with another descriptor of the shard, noised and
put back on the RootSIFT sphere: new descriptors with SIFT's statistics, as far from each
other as descriptors of different real images are. Every measurement runs in a process of
its own on one thread (wall time of the measured call, peak RSS of the process), so numbers
are per core; the machine is shared, so compare ratios within one run. One real point checks
the simulation: the devset's references plus real photos no index was trained on
(``--real-distractors``, default ``trainset/more_photos``), against the synthetic set of the
same size. Every IVF index of ``CURVES`` is built at every size and searched with all 400
devset queries: the 150 copy queries' true copies among the top-5 candidates, against exact
search at 1x (adding distractors only takes votes from a true copy, so exact search at scale
finds no more), codes scanned and time per query descriptor.

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
from local_fea import extract
from local_fea.extract import store_path

DEVSET = REPO_ROOT.parent / "shared" / "devset"
TRAIN_PHOTOS = REPO_ROOT.parent / "shared" / "trainset" / "photos"
REAL_DISTRACTORS = REPO_ROOT.parent / "shared" / "trainset" / "more_photos"
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
LARGE, LARGE_NPROBE = default_index(10**9)  # the one auto uses at a million references
# the curves: the index auto used at scale before the large-set one, and the large-set one at
# half its nprobe and at its own
CURVES = list(dict.fromkeys([("IVF4096,PQ64x4fs", 16), (LARGE, LARGE_NPROBE // 2),
                             (LARGE, LARGE_NPROBE)]))
# (factory string, nprobe) compared on the devset: the shipped default first. Measured
# 2026-11 and left out since (docs/history.md): IVF4096 at nprobe 8 and 32, IVF4096,PQ32x4fs,
# IVF4096,SQ8 and IVF4096_HNSW32,PQ64x4fs
COMPARED = list(dict.fromkeys([(DEFAULT, DEFAULT_NPROBE), ("IVF1024,PQ64x4fs", 4),
                               ("IVF4096,PQ64x4fs", 16), (LARGE, 4), (LARGE, 8),
                               (LARGE, LARGE_NPROBE), (LARGE, 32)]))


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
    shards = [(devset_refs.shard_path(k) if c == 0 else pool / f"shard_{c * n + k:05d}.pkl",
               list(ids) if c == 0 else [f"X{c:03d}-{i}" for i in ids])
              for c in range(factor) for k, ids in enumerate(devset_refs.shards)]
    return linked_store(root / f"refs-x{factor}", shards, "synthetic")


def real_store(devset_refs: ShardStore, distractors: ShardStore, root: Path) -> ShardStore:
    """The devset references plus the real photos of ``distractors``, as one shard store."""
    shards = [(store.shard_path(k), list(ids)) for store in (devset_refs, distractors)
              for k, ids in enumerate(store.shards)]
    return linked_store(root / "refs-real", shards, "real distractors")


def linked_store(store: Path, shards: list[tuple[Path, list[str]]], source: str) -> ShardStore:
    """A shard store at ``store`` whose shard files are links to ``shards``' (file, ids)."""
    store.mkdir(parents=True, exist_ok=True)
    for j, (src, _) in enumerate(shards):
        link = store / f"shard_{j:05d}.pkl"
        if not link.exists():
            link.symlink_to(src)
    write_json(store / "manifest.json", {"set": store.name, "source": source,
                                         "shard_size": max(len(i) for _, i in shards),
                                         "shards": [i for _, i in shards], "paths": {}})
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
            decode_images,
            load_index,
            removed_ids,
        )

        refs = ShardStore(spec["refs"])
        names, owners, desc = _queries(ShardStore(spec["queries"]), spec.get("query_ids"))
        if kind == "exact":
            searcher = ExactSearch(refs, K, False, block_rows({"block_mb": spec["block_mb"]},
                                                              False))
        else:
            start = time.perf_counter()
            index = load_index(spec["index"], spec["nprobe"])
            load_seconds = time.perf_counter() - start  # what a part costs to read
            searcher = IndexSearch(index, K, spec["nprobe"], removed_ids(refs))
        faiss.cvar.indexIVF_stats.reset()
        start = time.perf_counter()
        dist, ids = searcher(desc)
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "query_desc": len(desc), "ref_images": len(refs),
               "candidates": _candidates(names, owners, dist, ids, refs)}
        if kind == "ivf-search":
            base = decode_images(ids[:, 0])  # each query descriptor's nearest reference image
            out.update(codes_per_desc=faiss.cvar.indexIVF_stats.ndis / len(desc),
                       load_seconds=load_seconds, index_bytes=Path(spec["index"]).stat().st_size,
                       nearest_in_base=float(np.mean((base >= 0) & (base < spec["n_base"]))))
        return out
    if kind == "ivf-build":
        from local_fea.index import ReferenceIndex, trained_index_path

        refs = ShardStore(spec["refs"])
        conf = {**load_config()["local_search"], "index": spec["factory"],
                "trained_dir": spec["trained_dir"], "index_part_mb": 2**30}  # one part
        folder = Path(spec["out"])
        start = time.perf_counter()
        (path,) = ReferenceIndex(folder, conf, spec["features"]).update(refs)  # one part
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
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 10, 67])
    parser.add_argument("--block-mb", type=int, default=256,
                        help="exact search block (smaller than the 1x set: it streams)")
    parser.add_argument("--agreement-factors", type=int, nargs="*", default=[1, 10])
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the comparison of compressed indexes on the devset")
    parser.add_argument("--train-photos", type=Path, default=TRAIN_PHOTOS,
                        help="the photos `make train-index` extracted")
    parser.add_argument("--real-distractors", type=Path, default=REAL_DISTRACTORS,
                        help="real photos that no index was trained on (described here)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(json.loads(args.point))))
        return

    conf, work = load_config(), args.work.resolve()
    devset_refs = ShardStore(store_path(conf, list_images(DEVSET / "references"), work, False))
    queries = str(store_path(conf, list_images(DEVSET / "queries"), work, True))
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
    n_base = len(devset_refs.shards) * devset_refs.shard_size  # devset images come first

    def curve_point(name: str, store: ShardStore) -> None:
        """Exact search (the curve's queries) and every index of ``CURVES`` (all queries)."""
        results.get(f"exact-curve-{name}", {"kind": "exact", "refs": str(store.root),
                                            "queries": queries, "query_ids": q2,
                                            "block_mb": args.block_mb})
        for factory, nprobe in CURVES:
            build = results.get(f"ivf-build-{tag(factory)}-{name}", {
                "kind": "ivf-build", "refs": str(store.root), "factory": factory,
                "trained_dir": shipped_dir, "features": features,
                "out": str(root / "index" / f"{name}-{tag(factory)}")})
            results.get(search_key(factory, nprobe, name), {
                "kind": "ivf-search", "refs": str(store.root), "queries": queries,
                "index": build["index"], "nprobe": nprobe, "n_base": n_base})

    extract.main(conf, args.real_distractors, work)  # described once, then reused
    real = real_store(devset_refs, ShardStore(
        store_path(conf, list_images(args.real_distractors), work, False)), root)
    for f in sorted(args.factors):
        store = scaled_store(devset_refs, f, root)
        curve_point(f"x{f}", store)
        if f in args.agreement_factors:
            results.get(f"exact-q16-x{f}", {"kind": "exact", "refs": str(store.root),
                                            "queries": queries, "query_ids": q16,
                                            "block_mb": args.block_mb})
    curve_point("real", real)
    results.get("exact-q200-real", {"kind": "exact", "refs": str(real.root),
                                    "queries": queries, "query_ids": q200,
                                    "block_mb": args.block_mb})

    # compressed indexes against exact search, on the devset (200 queries)
    trained_dir = root / "trained"
    compared = [] if args.no_compare else COMPARED
    if compared:
        results.get("exact-q200-x1", {"kind": "exact", "refs": str(devset_refs.root),
                                      "queries": queries, "query_ids": q200,
                                      "block_mb": args.block_mb})
        train_variants(features, training, trained_dir)
    for factory, nprobe in compared:
        tdir = shipped_dir if shipped_index(factory, features) else str(trained_dir)
        name = tag(factory)
        build = results.get(f"cmp-build-{name}", {
            "kind": "ivf-build", "refs": str(devset_refs.root), "factory": factory,
            "trained_dir": tdir, "features": features, "out": str(root / "cmp" / name)})
        results.get(f"cmp-search-{name}-np{nprobe}", {
            "kind": "ivf-search", "refs": str(devset_refs.root), "queries": queries,
            "query_ids": q200, "index": build["index"], "nprobe": nprobe, "n_base": n_base})

    candidates = next((work / "local_search").glob(
        f"*/{Path(queries).name}-vs-{devset_refs.root.name}/candidates.csv"), None)
    if candidates is not None:
        results.get("stages", {"kind": "stages", "tmp": str(root / "stages"), "images": 64,
                               "pairs": 200, "candidates": str(candidates),
                               "refs": str(devset_refs.root), "queries": queries})
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


def codes(search: dict) -> str:
    """Codes scanned per query descriptor of a search result ("-" in one cached before it
    was measured)."""
    return _fmt(search["codes_per_desc"], 0) if "codes_per_desc" in search else "-"


def search_key(factory: str, nprobe: int, name: str) -> str:
    """Results key of the search of ``factory`` at ``nprobe`` in the set ``name`` (x1, real)."""
    return f"ivf-search-{tag(factory)}-np{nprobe}-{name}"


def copies_found(data: dict[str, Any], key: str, gt: dict[str, str]) -> str:
    """'found of copies' for the candidates of a results entry."""
    copies = {q for q, r in gt.items() if r}
    return f"{gt_recall(data[key]['candidates'], gt, copies) * len(copies):.0f} of {len(copies)}"


def report(data: dict[str, Any], factors: list[int], gt: dict[str, str], q2: list[str],
           q16: list[str], q200: list[str], block_mb: int) -> None:
    names = [f"x{f}" for f in factors] + ["real"]
    exact = data.get("exact-q200-x1")
    lines = ["# Scaling benchmark (`python -m bench.bench_scale`)", "",
             "Generated by `bench/bench_scale.py` on the devset (1,500 references; larger "
             "sets add synthetic distractor images, see the script; the `real` row adds "
             "1,495 real photos instead). One core per measurement, each in its own process; "
             "peak RSS of that process. The machine is shared: read ratios, not absolute "
             "seconds.", "",
             "## Exact search against the number of references", "",
             f"Reference blocks of {block_mb} MB (float32) streamed through `IndexFlatL2` "
             f"into result heaps ({len(q2)} copy queries, both views).", "",
             "| references | ref. descriptors | exact search s | µs per (query desc × M "
             "ref desc) | peak RSS MB |", "|---|---|---|---|---|"]
    for name in names:
        e, b = data.get(f"exact-curve-{name}"), data.get(f"ivf-build-{tag(CURVES[0][0])}-{name}")
        if e and b:
            unit = e["seconds"] / (e["query_desc"] * b["ntotal"] / 1e6) * 1e6
            lines.append(f"| {e['ref_images']:,}{' (real)' * (name == 'real')} | "
                         f"{b['ntotal'] / 1e6:.1f} M | {_fmt(e['seconds'], 1)} | "
                         f"{_fmt(unit, 0)} | {e['peak_rss_mb']:.0f} |")
    lines += ["", "## The IVF indexes against the number of references", "",
              "Each index built by `ReferenceIndex.update` and searched with all 400 devset "
              "queries. Codes scanned: PQ codes compared per query descriptor "
              "(`indexIVF_stats.ndis`), what the search time grows with. True copies: the 150 "
              "copy queries whose reference is among the top-5 candidates of either view; "
              + (f"exact search finds {copies_found(data, 'exact-q200-x1', gt)} at 1x "
                 "(distractors only take votes from a true copy, so it finds no more at "
                 "scale)" if exact else "")
              + (f" and {copies_found(data, 'exact-q200-real', gt)} with the real distractors"
                 if "exact-q200-real" in data else "") + ". Nearest in devset: query "
              "descriptors whose "
              "first neighbour is a devset reference rather than a distractor.", "",
              "| references | index, nprobe | build s | µs per added desc | index MB (bytes "
              "per desc) | search s | ms per query desc | codes scanned per query desc | "
              "true copies in top-5 | nearest in devset | search peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for factory, nprobe in CURVES:
            b = data.get(f"ivf-build-{tag(factory)}-{name}")
            key = search_key(factory, nprobe, name)
            if not (b and key in data):
                continue
            s = data[key]
            lines.append(
                f"| {b['ref_images']:,}{' (real)' * (name == 'real')} | `{factory}`, {nprobe} | "
                f"{_fmt(b['seconds'], 1)} | {_fmt(b['seconds'] / b['ntotal'] * 1e6, 1)} | "
                f"{b['bytes'] / 2**20:.0f} ({_per_desc(b):.1f}) | {_fmt(s['seconds'], 1)} | "
                f"{_fmt(s['seconds'] / s['query_desc'] * 1e3, 3)} | "
                f"{codes(s)} | {copies_found(data, key, gt)} | "
                f"{s['nearest_in_base']:.3f} | {s['peak_rss_mb']:.0f} |")
    qset = set(q16)
    rows = [(f, factory, nprobe) for f in factors if f"exact-q16-x{f}" in data
            for factory, nprobe in CURVES if search_key(factory, nprobe, f"x{f}") in data]
    if rows:
        lines += ["", "Candidates of the IVF indexes against exact search at scale (16 copy "
                  "queries, both views): fraction of the exact top-5 candidates recovered, "
                  "and of the true copies found in the top-5 (exact / index).", "",
                  "| references | index, nprobe | recovers exact top-5 | true copies in "
                  "top-5: exact | index |", "|---|---|---|---|---|"]
        for f, factory, nprobe in rows:
            e = data[f"exact-q16-x{f}"]
            approx = [r for r in data[search_key(factory, nprobe, f"x{f}")]["candidates"]
                      if r[0] in qset]
            lines.append(f"| {e['ref_images']:,} | `{factory}`, {nprobe} | "
                         f"{agreement(e['candidates'], approx):.3f} | "
                         f"{gt_recall(e['candidates'], gt, qset):.3f} | "
                         f"{gt_recall(approx, gt, qset):.3f} |")

    if exact:
        qset = set(q200)
        lines += ["", "## Compressed indexes against exact search (devset, 200 queries: the "
                  "150 copies and 50 distractors)", "",
                  "Indexes trained on the training photos only (the shipped ones; k-means "
                  "once per nlist for others); 1,500 references, 0.80 M descriptors. Bytes "
                  "per descriptor: what the populated index adds per descriptor (code, 8-byte "
                  "id, list padding), the trained quantiser aside. With so few references "
                  "the lists are short: scanning them is a small part of the time, which the "
                  "codes scanned per query descriptor predict at scale.",
                  "",
                  "| index | nprobe | recovers exact top-5 | true copies in top-5 | search s | "
                  "speed-up vs exact | codes scanned per query desc | bytes per descriptor | "
                  "index build s |", "|---|---|---|---|---|---|---|---|---|",
                  f"| Flat (exact, streamed) | - | 1.000 | "
                  f"{gt_recall(exact['candidates'], gt, qset):.3f} | "
                  f"{_fmt(exact['seconds'], 1)} | 1 | all | 512 (float32; uint8 in the store: "
                  "128) | - |"]
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
                f"{_fmt(exact['seconds'] / s['seconds'], 0)} | {codes(s)} | "
                f"{_per_desc(b):.1f} | {_fmt(b['seconds'], 1)} |")
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
    plot(data, [f"x{f}" for f in factors], DOCS / "scale_bench.png")


def plot(data: dict[str, Any], names: list[str], path: Path) -> None:
    """Time per query descriptor (exact and each index), index build time and memory against
    the number of references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    exact = [data[f"exact-curve-{n}"] for n in names if f"exact-curve-{n}" in data]
    left.loglog([e["ref_images"] for e in exact],
                [e["seconds"] / e["query_desc"] * 1e3 for e in exact], "o-",
                label="exact streamed search, ms per query descriptor")
    for (factory, nprobe), marker in zip(CURVES, "s^v", strict=True):
        points = [(data[f"ivf-build-{tag(factory)}-{n}"], data[search_key(factory, nprobe, n)])
                  for n in names if search_key(factory, nprobe, n) in data]
        refs = [b["ref_images"] for b, _ in points]
        left.loglog(refs, [s["seconds"] / s["query_desc"] * 1e3 for _, s in points],
                    f"{marker}-", label=f"{factory} (nprobe {nprobe}), ms per query descriptor")
        if nprobe == max(n for f, n in CURVES if f == factory):  # one build per index
            left.loglog(refs, [b["seconds"] for b, _ in points], f"{marker}:",
                        label=f"{factory} build (add), s")
            right.semilogx(refs, [s["peak_rss_mb"] for _, s in points], f"{marker}-",
                           label=f"{factory} search (index in memory)")
            right.semilogx(refs, [b["bytes"] / 2**20 for b, _ in points], f"{marker}--",
                           label=f"{factory} index file")
    right.semilogx([e["ref_images"] for e in exact], [e["peak_rss_mb"] for e in exact], "o-",
                   label="exact streamed search")
    left.set_xlabel("reference images")
    left.set_title("time (one core)")
    left.legend(fontsize=7, loc="center right")
    left.grid(True, which="both", alpha=0.3)
    right.set_xlabel("reference images")
    right.set_ylabel("MB")
    right.set_title("peak resident memory")
    right.legend(fontsize=7)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from bench import bench_scale

    bench_scale.main()
