"""Benchmark of the whole default pipeline against its floor, measured in the same run.

    python -m bench.bench_pipeline [--queries DIR] [--references DIR] [--work DIR] [-o K=V]

Runs ``python -m copydet run`` (every branch, the defaults) and prints each stage's wall time,
CPU time, throughput and peak memory (from the run record, ``pipeline.json``). Then the
floor, with the same number of cores, over every image and view the run described:

- a bare decode + SIFT loop over the references and each local branch's queries (the query
  folder, the detector's crops; with the query keypoint budget: the stage derives their
  mirror view without a second SIFT);
- a bare forward of the same network in the stage's runtime (``global_fea.runtime``) over the
  references and each global branch's queries (mirrored too with ``mirror_queries``);
- a bare decode + forward of the overlay detector over the queries, when a crop branch runs;
- a bare Faiss search of every local branch's query descriptors in the populated index.

The parts over the two input folders are measured before and after the run and averaged, so
that the machine's drift over the run cancels; the crops' and the search's need the run's
outputs and come after it. ``pipeline / floor`` is what everything around the extraction
costs. Defaults to ../shared/devset; ``data.make_timing_set`` builds a larger set.
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

import pipeline
from bench.bare_sift import bare_loop
from bench.bench_global import bare_pass, network
from bench.memory import measure
from common.config import REPO_ROOT, load_config
from common.images import list_images
from common.parallel import resolve_n_jobs
from common.shards import ShardStore
from global_fea.extract import batch_size
from local_fea import search
from local_fea.index import load_index
from local_fea.search import query_block
from merge.evidence import read_global, read_local
from preprocess import detect

DEVSET = REPO_ROOT.parent / "shared" / "devset"


def _sift_chunk(args: tuple[list[Path], int, int, bool]) -> int:
    return bare_loop(*args)


def described(conf: dict) -> tuple[bool, bool, bool]:
    """Whether the branches of ``merge.branches`` describe images by SIFT, by the global
    network, and run the overlay detector (the queries' crops, the local branch's frames)."""
    branches = pipeline.selected(conf["merge"]["branches"])
    return (any(b.evidence.read is read_local for b in branches),
            any(b.evidence.read is read_global for b in branches),
            any(pipeline.DETECT[0] in b.sections for b in branches))


def crop_sets(record: dict, kind: str) -> list[list[Path]]:
    """The crops each recorded crop branch of ``kind`` (``query_store``: a local branch,
    ``h5``: a global one) described."""
    sets = []
    for outputs in record["branches"].values():
        if kind not in outputs or "boxes" not in outputs:
            continue
        if kind == "query_store":
            store = ShardStore(outputs["query_store"])
            sets.append([store.source_path(i) for i in store.ids if not store.is_removed(i)])
        else:
            sets.append(list(detect.crop_set(Path(outputs["boxes"]), "global").paths))
    return sets


def sift_floor(conf: dict, sets: list[tuple[list[Path], int]], n_jobs: int) -> float:
    """Seconds of a bare decode + SIFT loop over every (images, keypoint budget) set on
    ``n_jobs`` processes (queries: no second SIFT for the mirror view, which the stage
    derives)."""
    chunks = [(paths[i::n_jobs], conf["local_fea"]["short_side"], budget, False)
              for paths, budget in sets for i in range(n_jobs) if paths]
    start = time.perf_counter()
    if chunks:
        with Pool(n_jobs) as pool:
            pool.map(_sift_chunk, chunks, chunksize=1)
    return time.perf_counter() - start if chunks else 0.0


def forward_floor(conf: dict, sets: list[tuple[list[Path], bool]], n_jobs: int,
                  folder: Path) -> float:
    """Seconds of a bare decode + forward of the global network, in the stage's runtime
    (its ONNX export in ``folder``), over every (images, mirrored too) set."""
    sets = [(paths, mirror) for paths, mirror in sets if paths]
    if not sets:
        return 0.0
    section = conf["global_fea"]
    batch = batch_size(section, torch.device("cpu"))
    args = (network(section, folder, n_jobs), section["image_size"], batch)
    bare_pass(sets[0][0][:batch], *args)  # warm-up: first calls
    start = time.perf_counter()
    for paths, mirror in sets:
        bare_pass(paths, *args, mirror=mirror)
    return time.perf_counter() - start


def detect_floor(conf: dict, queries: list[Path], n_jobs: int, config_dir: Path) -> float:
    """Seconds of a bare decode + forward of the overlay detector over ``queries`` as the
    stage runs it (``detect.Detector``: one replica per core on CPU, decoding on as many
    threads), without box selection, crops or shards."""
    if not queries:
        return 0.0
    from preprocess.yolo import set_threads

    section, step, threads = conf["preprocess"], conf["run"]["shard_size"], torch.get_num_threads()
    try:
        detector = detect.Detector(section, n_jobs, config_dir)
        detector.find(queries[:section["batch"]])  # warm-up: first calls
        start = time.perf_counter()
        for s in range(0, len(queries), step):  # a shard at a time, as the stage
            detector.find(queries[s:s + step])
        return time.perf_counter() - start
    finally:
        set_threads(threads)


def input_floor(conf: dict, queries: list[Path], refs: list[Path], n_jobs: int,
                scratch: Path) -> dict[str, float]:
    """The floor's parts over the two input folders (what the branches describe of them):
    measured before and after the run, so that the machine's drift over the run cancels."""
    sift, forward, crops = described(conf)
    lf, gf = conf["local_fea"], conf["global_fea"]
    return {
        "decode + SIFT": sift_floor(conf, [(refs, lf["max_keypoints"]),
                                           (queries, lf["query_max_keypoints"])]
                                    if sift else [], n_jobs),
        "decode + forward": forward_floor(conf, [(refs, False), (queries, gf["mirror_queries"])]
                                          if forward else [], n_jobs, scratch / "network"),
        "decode + detector forward": detect_floor(conf, queries if crops else [], n_jobs,
                                                  scratch / "ultralytics"),
    }


def crop_floor(conf: dict, record: dict, n_jobs: int, scratch: Path) -> dict[str, float]:
    """The floor's parts over the detector's crops, which exist only after the run."""
    lf, gf = conf["local_fea"], conf["global_fea"]
    return {
        "decode + SIFT, crops": sift_floor(conf, [(c, lf["query_max_keypoints"]) for c in
                                                  crop_sets(record, "query_store")], n_jobs),
        "decode + forward, crops": forward_floor(conf, [(c, gf["mirror_queries"]) for c in
                                                        crop_sets(record, "h5")],
                                                 n_jobs, scratch / "network"),
    }


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
    queries = list(list_images(args.queries).paths)
    refs = list(list_images(args.references).paths)
    with tempfile.TemporaryDirectory(prefix="bench_floor-") as scratch:
        before = input_floor(conf, queries, refs, n_jobs, Path(scratch) / "before")
    overrides = [x for o in args.override for x in ("-o", o)]
    run = measure([sys.executable, "-m", "copydet", "run", "--queries", str(args.queries),
                   "--references", str(args.references), "--work", str(work), *overrides],
                  cwd=REPO_ROOT)
    if run.returncode:
        raise SystemExit(f"the pipeline failed (exit {run.returncode})")
    record = json.loads((work / "pipeline.json").read_text())
    print(f"pipeline on {args.queries} x {args.references}, {n_jobs} cores")
    print(f"  {'stage':44s} {'wall s':>8s} {'CPU s':>8s} {'img/s':>8s} {'peak MB':>8s}")
    for stage in record["stages"]:
        name = f"{stage['stage']} {stage['label']}"
        rate = stage_images(stage, len(queries), len(refs)) / max(stage["seconds"], 1e-9)
        print(f"  {name[:44]:44s} {stage['seconds']:8.1f} {stage['cpu_seconds']:8.1f} "
              f"{rate:8.1f} {stage['peak_rss_mb']:8.0f}")
    total = sum(s["seconds"] for s in record["stages"])
    print(f"  {'all stages':44s} {total:8.1f}   (whole run {run.seconds:.1f} s, peak "
          f"{run.peak_rss_mb:.0f} MB)")
    with tempfile.TemporaryDirectory(prefix="bench_floor-") as scratch:
        after = input_floor(conf, queries, refs, n_jobs, Path(scratch) / "after")
        floor = {name: (before[name] + after[name]) / 2 for name in before}
        floor |= crop_floor(conf, record, n_jobs, Path(scratch) / "after")
    floor["Faiss search"] = search_floor(conf, record, work, n_jobs)
    print(f"floor: every image, crop and view the run described, {n_jobs} cores (the input "
          "folders' parts: the mean of before and after the run)")
    for name, seconds in floor.items():
        drift = f"  (before {before[name]:.1f}, after {after[name]:.1f})" if name in before else ""
        print(f"  {name:44s} {seconds:8.1f}{drift}")
    print(f"  {'floor':44s} {sum(floor.values()):8.1f}")
    ratio = run.seconds / sum(floor.values())
    n_images = len(queries) + len(refs)
    print(f"pipeline / floor = {ratio:.2f}  ({n_images / run.seconds:.1f} images/s end to end)")
    report = {"stages": record["stages"], "run_seconds": run.seconds,
              "peak_rss_mb": run.peak_rss_mb, "floor": floor, "floor_before": before,
              "floor_after": after, "ratio": ratio}
    (work / "bench_pipeline.json").write_text(json.dumps(report, indent=1))
    print(f"figures in {work / 'bench_pipeline.json'}")


if __name__ == "__main__":
    main()
