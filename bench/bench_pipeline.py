"""Benchmark of the whole default pipeline against its floor, measured in the same run.

    python -m bench.bench_pipeline [--queries DIR] [--references DIR] [--work DIR] [-o K=V]

Runs ``python -m pipeline run`` (every branch, the defaults) and prints each stage's wall time,
CPU time, throughput and peak memory (from the run record, ``pipeline.json``). Then the
floor, with the same number of cores, over every image and view the run described: a bare
decode + SIFT loop over the references and each local branch's queries (the query folder, the
detector's crops; with the query keypoint budget: the stage derives their mirror view without
a second SIFT), a bare forward of the same network in the stage's runtime
(``global_fea.runtime``) over the references and each global branch's queries (mirrored too
with ``mirror_queries``), and a bare Faiss search of every local branch's query descriptors
in the populated index. ``pipeline / floor`` is what everything around the extraction costs.
Defaults to ../shared/devset; ``data.make_timing_set`` builds a larger set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import faiss
import numpy as np
import torch

from bench.bare_sift import bare_loop
from bench.bench_global import bare_pass, network
from bench.memory import measure
from common.config import REPO_ROOT, load_config
from common.images import list_images
from common.parallel import resolve_n_jobs
from common.shards import ShardStore
from global_fea import extract
from local_fea import search
from local_fea.index import load_index
from local_fea.search import query_block
from preprocess import detect

DEVSET = REPO_ROOT.parent / "shared" / "devset"


def _sift_chunk(args: tuple[list[Path], int, int, bool]) -> int:
    return bare_loop(*args)


def branch_queries(record: dict, kind: str, queries: list[Path]) -> list[list[Path]]:
    """The query images of each recorded branch of ``kind`` (``query_store``: a local branch,
    ``h5``: a global one), as the run described them: ``queries`` or the detector's crops."""
    sets = []
    for outputs in record["branches"].values():
        if kind not in outputs:
            continue
        if kind == "query_store":
            store = ShardStore(outputs["query_store"])
            sets.append([store.source_path(i) for i in store.ids if not store.is_removed(i)])
        elif "boxes" in outputs:
            sets.append(list(detect.crop_set(Path(outputs["boxes"]), "global").paths))
        else:
            sets.append(queries)
    return sets


def sift_floor(conf: dict, query_sets: list[list[Path]], refs: list[Path], n_jobs: int) -> float:
    """Seconds of a bare decode + SIFT loop over the references and every query set on
    ``n_jobs`` processes (nothing without a local branch)."""
    section = conf["local_fea"]
    chunks = [(refs[i::n_jobs], section["short_side"], section["max_keypoints"], False)
              for i in range(n_jobs) if query_sets]
    chunks += [(queries[i::n_jobs], section["short_side"], section["query_max_keypoints"], False)
               for queries in query_sets for i in range(n_jobs)]  # mirror view: no second SIFT
    start = time.perf_counter()
    with Pool(n_jobs) as pool:
        pool.map(_sift_chunk, chunks, chunksize=1)
    return time.perf_counter() - start


def forward_floor(conf: dict, query_sets: list[list[Path]], refs: list[Path], n_jobs: int,
                  work: Path) -> float:
    """Seconds of a bare decode + forward of the global network (in the stage's runtime) over
    the references and every query set (nothing without a global branch)."""
    if not query_sets:
        return 0.0
    section = conf["global_fea"]
    torch.set_num_threads(n_jobs)
    net = network(section, extract.model_root(conf, work), n_jobs)  # the stage's export
    args = (net, section["image_size"], section["batch_size"])
    bare_pass(refs[:section["batch_size"]], *args)  # warm-up: first calls
    start = time.perf_counter()
    bare_pass(refs, *args)
    for queries in query_sets:
        bare_pass(queries, *args, mirror=section["mirror_queries"])
    return time.perf_counter() - start


def search_floor(conf: dict, record: dict, work: Path, n_jobs: int) -> float:
    """Seconds of a bare Faiss search of every local branch's query descriptors in the
    populated index (nothing without a local branch)."""
    branches = [o for o in record["branches"].values() if "query_store" in o]
    if not branches:
        return 0.0
    refs = Path(branches[0]["reference_store"])
    conf = search.resolved(conf, ShardStore(refs))
    section = conf["local_search"]
    index_file = next(search.index_folder(conf, refs, work).glob("index-*.faiss"))
    index = load_index(index_file, section["nprobe"])
    stores = [ShardStore(o["query_store"]) for o in branches]
    desc = np.concatenate([query_block(s, k)[2] for s in stores for k in range(len(s.shards))])
    faiss.omp_set_num_threads(n_jobs)
    start = time.perf_counter()
    for s in range(0, len(desc), section["query_batch"]):
        index.search(desc[s:s + section["query_batch"]], section["k"])
    return time.perf_counter() - start


def stage_images(stage: dict, n_queries: int, n_refs: int) -> int:
    """Images a recorded stage went through: a feature store's own (references, queries,
    crops), both sets for the global descriptors, else the queries."""
    output = Path(stage["output"])
    if (output / "manifest.json").exists():
        return len(ShardStore(output))
    return n_queries + n_refs if stage["stage"] == "global_fea.extract" else n_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=Path, default=DEVSET / "queries")
    parser.add_argument("--references", type=Path, default=DEVSET / "references")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline-"))).resolve()
    conf = load_config(overrides=args.override)
    n_jobs = resolve_n_jobs(conf["run"]["n_jobs"])
    overrides = [x for o in args.override for x in ("-o", o)]
    run = measure([sys.executable, "-m", "pipeline", "run", "--queries", str(args.queries),
                   "--references", str(args.references), "--work", str(work), *overrides],
                  cwd=REPO_ROOT)
    if run.returncode:
        raise SystemExit(f"the pipeline failed (exit {run.returncode})")
    record = json.loads((work / "pipeline.json").read_text())
    print(f"pipeline on {args.queries} x {args.references}, {n_jobs} cores")
    queries = list(list_images(args.queries).paths)
    refs = list(list_images(args.references).paths)
    print(f"  {'stage':44s} {'wall s':>8s} {'CPU s':>8s} {'img/s':>8s} {'peak MB':>8s}")
    for stage in record["stages"]:
        name = f"{stage['stage']} {stage['label']}"
        rate = stage_images(stage, len(queries), len(refs)) / max(stage["seconds"], 1e-9)
        print(f"  {name[:44]:44s} {stage['seconds']:8.1f} {stage['cpu_seconds']:8.1f} "
              f"{rate:8.1f} {stage['peak_rss_mb']:8.0f}")
    total = sum(s["seconds"] for s in record["stages"])
    print(f"  {'all stages':44s} {total:8.1f}   (whole run {run.seconds:.1f} s, peak "
          f"{run.peak_rss_mb:.0f} MB)")
    local_sets, global_sets = (branch_queries(record, k, queries)
                                 for k in ("query_store", "h5"))
    floor = {"decode + SIFT": sift_floor(conf, local_sets, refs, n_jobs),
             "decode + forward": forward_floor(conf, global_sets, refs, n_jobs, work),
             "Faiss search": search_floor(conf, record, work, n_jobs)}
    n_images = len(queries) + len(refs)
    print(f"floor: every image, crop and view the run described, {n_jobs} cores")
    for name, seconds in floor.items():
        print(f"  {name:44s} {seconds:8.1f}")
    print(f"  {'floor':44s} {sum(floor.values()):8.1f}")
    ratio = run.seconds / sum(floor.values())
    print(f"pipeline / floor = {ratio:.2f}  ({n_images / run.seconds:.1f} images/s end to end)")
    report = {"stages": record["stages"], "run_seconds": run.seconds,
              "peak_rss_mb": run.peak_rss_mb, "floor": floor, "ratio": ratio}
    (work / "bench_pipeline.json").write_text(json.dumps(report, indent=1))
    print(f"figures in {work / 'bench_pipeline.json'}")


if __name__ == "__main__":
    main()
