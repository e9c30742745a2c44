"""Capacity plan: what 1M references x 50k queries cost, from the measured per-unit costs.

    python -m bench.capacity_plan --work work      # after python -m bench.bench_scale

Reads ``<work>/bench/scale/results.json`` (the measurements of ``bench.bench_scale``: per-core
costs of extraction, index building, search and verification, bytes per image) and writes
``docs/capacity.md`` with every figure's arithmetic. GPU figures are not
measured here (no GPU on the benchmark machine): GPU search time is computed from the work in
FLOP and an assumed sustained throughput, or from the memory traffic per distance of the torch
path and a GPU's bandwidth, both stated in the table (``make gpu-check`` measures them).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.bench_scale import CURVES, LARGE, LARGE_NPROBE, search_key, tag
from common.config import REPO_ROOT, load_config
from common.io import write_text

REFS, QUERIES, VIEWS, C = 1_000_000, 50_000, 2, 5
PART_MB = load_config()["local_search"]["index_part_mb"]


@dataclass
class Node:
    name: str
    nodes: int
    cores: int  # per node
    ram_gb: int  # per node
    gpus: int = 0  # per node


GPU_BANDWIDTH = 3.35e12  # bytes/s of one H100 SXM's memory
TORCH_BYTES = 16  # GPU memory traffic per distance of common.torch_knn (estimate)
GPU_NODE = Node("one 8-GPU node (8x H100 80 GB, 2x 56 cores, 2 TB RAM)", 1, 112, 2048, 8)
CPU_CLUSTER = Node("a CPU Dask cluster (16 nodes x 32 cores, 128 GB RAM each)", 16, 32, 128)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def fit_linear(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


@dataclass
class IndexCosts:
    """Per-core costs of one IVF index, from the ``bench.bench_scale`` curve points."""

    factory: str
    nprobe: int
    add_s: float  # per added descriptor
    bytes_desc: float  # populated index bytes per descriptor, at the largest point
    search_a: float  # search s per query descriptor = search_a + search_b * ref descriptors
    search_b: float
    codes_frac: float  # codes scanned per query descriptor / ref descriptors (largest point)
    points: int
    max_desc: int

    def search_s(self, n_ref_desc: float) -> float:
        return self.search_a + self.search_b * n_ref_desc

    @property
    def label(self) -> str:
        return f"{self.factory} at nprobe {self.nprobe}"


def index_costs(data: dict, factory: str, nprobe: int) -> IndexCosts:
    """Fit the search time per query descriptor linearly in the reference descriptors over the
    synthetic curve points of ``factory`` (the real-photo point is a check, not a fit point)."""
    builds = {k.rsplit("-", 1)[1]: v for k, v in data.items()
              if k.startswith(f"ivf-build-{tag(factory)}-x")}
    points = sorted((b["ntotal"], data[search_key(factory, nprobe, name)])
                    for name, b in builds.items() if search_key(factory, nprobe, name) in data)
    largest = max(builds.values(), key=lambda b: b["ntotal"])  # the least list padding
    a, b = fit_linear([n for n, _ in points], [s["seconds"] / s["query_desc"] for _, s in points])
    n_max, s_max = points[-1]
    return IndexCosts(factory, nprobe,
                      sum(v["seconds"] for v in builds.values())
                      / sum(v["ntotal"] for v in builds.values()),
                      (largest["bytes"] - largest["trained_bytes"]) / largest["ntotal"], a, b,
                      s_max["codes_per_desc"] / n_max, len(points), n_max)


def parted_workers(part_gb: float) -> int:
    """One-thread search processes a cluster node holds: a part and ~2 GB of queries each."""
    return int(CPU_CLUSTER.ram_gb // (part_gb + 2))


def max_factor(data: dict) -> int:
    """The largest synthetic curve point measured."""
    return max(int(k.rsplit("-x", 1)[1]) for k in data if k.startswith("exact-curve-x"))


def plan(data: dict, gpu_tflops: float, efficiency: float) -> str:
    st = data["stages"]
    old, new = index_costs(data, *CURVES[0]), index_costs(data, LARGE, LARGE_NPROBE)
    exact = max((data[k] for k in data if k.startswith("exact-curve-x")),
                key=lambda e: e["ref_images"])
    d_r, d_q = st["reference_desc_per_image"], st["query_desc_per_image"]
    n_r, n_q = REFS * d_r, QUERIES * VIEWS * d_q
    pairs = QUERIES * VIEWS * C

    t_er, t_eq, t_v = (st["extract_reference_s_per_image"], st["extract_query_s_per_image"],
                       st["verify_s_per_pair"])
    ref_desc = exact["ref_images"] * d_r
    unit_exact = exact["seconds"] / (exact["query_desc"] * ref_desc)  # s per (q desc x r desc)
    flop = n_q * n_r * 2 * 128

    ext_core = REFS * t_er + QUERIES * t_eq
    add_core = n_r * new.add_s
    ivf_core, old_core = n_q * new.search_s(n_r), n_q * old.search_s(n_r)
    ver_core = pairs * t_v
    exact_cpu_core = n_q * n_r * unit_exact
    gpu_s = flop / (gpu_tflops * 1e12 * GPU_NODE.gpus)
    torch_rate = GPU_BANDWIDTH / TORCH_BYTES  # distances/s per GPU, bandwidth-bound
    torch_s = n_q * n_r / (torch_rate * GPU_NODE.gpus)
    index_gb = n_r * new.bytes_desc / 1e9
    part_gb = PART_MB * 2**20 / 1e9
    n_parts = int(np.ceil(index_gb / part_gb))
    load = data[search_key(new.factory, new.nprobe, f"x{max_factor(data)}")]
    read_s_per_gb = load["load_seconds"] / (load["index_bytes"] / 1e9)
    node_groups = int(np.ceil(n_q * 128 * 4 / (part_gb * 1e9 / 4)))  # a quarter part each
    cluster_procs = CPU_CLUSTER.nodes * parted_workers(part_gb)
    node_read_core = node_groups * index_gb * read_s_per_gb
    cluster_read_core = cluster_procs * index_gb * read_s_per_gb
    parted_cluster_wall = (ivf_core + cluster_read_core) / (cluster_procs * efficiency)
    fp16_gb = n_r * 128 * 2 / 1e9
    store_gb = (REFS * st["reference_bytes_per_image"]
                + QUERIES * st["query_bytes_per_image"]) / 1e9

    def wall_s(core_s: float, node: Node, nodes: int | None = None) -> float:
        return core_s / (node.cores * (node.nodes if nodes is None else nodes) * efficiency)

    def wall(core_s: float, node: Node, nodes: int | None = None) -> str:
        return hours(wall_s(core_s, node, nodes))

    def search_row(c: IndexCosts, core: float, note: str) -> str:
        return (f"| search, {c.label} (CPU{note}) | {n_q / 1e6:,.1f} M × ({c.search_a * 1e3:.3f}"
                f" + {c.search_b * 1e9:.5f} × {n_r / 1e6:,.0f}) ms | {hours(core)} | "
                f"{wall(core, GPU_NODE)} | {wall(core, CPU_CLUSTER)} |")

    def unit_row(c: IndexCosts) -> list[str]:
        return [f"| {c.factory} add (assignment + encoding) | {c.add_s * 1e6:.1f} µs / "
                f"descriptor | all its curve points |",
                f"| {c.label} search | {c.search_a * 1e3:.4f} ms + {c.search_b * 1e9:.5f} ms "
                f"per M reference descriptors, per query descriptor (scans "
                f"{c.codes_frac * 1e6:,.0f} codes per M) | linear fit over {c.points} "
                f"reference counts up to {c.max_desc / 1e6:.0f} M desc |"]

    total_gpu_ivf = wall_s(ext_core + add_core + ivf_core + ver_core, GPU_NODE)
    total_gpu_exact = wall_s(ext_core + ver_core, GPU_NODE) + gpu_s
    total_torch_exact = wall_s(ext_core + ver_core, GPU_NODE) + torch_s
    total_cluster = (wall_s(ext_core + ivf_core + ver_core, CPU_CLUSTER)
                     + wall_s(add_core, CPU_CLUSTER, 1))

    lines = [
        "# Capacity plan: 1M references × 50k queries", "",
        "Generated by `python -m bench.capacity_plan` from the measurements of "
        "`python -m bench.bench_scale` (`docs/scale_bench.md`): per-core costs measured on "
        "the machine that ran the benchmark (one core per measurement, "
        "shared, so read them as ±30 %), multiplied out below. Wall times divide core time "
        f"by the cores available at {efficiency:.0%} parallel efficiency.", "",
        "**Measured and estimated.** Every per-core CPU cost below is measured "
        "(`bench.bench_scale`, table \"Measured unit costs\"); every GPU figure is an "
        "estimate. No GPU was available in the session that added the torch GPU paths (issue "
        "11: exact float16 search on every GPU through torch, torch stages on every GPU of a "
        "node), so `make gpu-check` (`python -m bench.gpu_check`, which measures query "
        "descriptors/s searched, images/s described and detected, and peak GPU memory, after "
        "checking the GPU results against the CPU) has not run on a GPU yet. The estimated "
        "rows say so; replace them with its figures once it has run.", "",
        f"**Index.** A million references is past `local_search.index: auto`'s last switch, "
        f"so the CPU rows are those of `{new.factory}` at nprobe {new.nprobe}: a 16,384-list "
        "quantiser searched through HNSW, trained by two-level k-means on training photos. "
        f"It scans {new.codes_frac / old.codes_frac:.2f}× the codes of `{old.factory}` at "
        f"nprobe {old.nprobe} (the index `auto` used at this size before), which the row "
        "below it prices for comparison. Both search times are fitted on synthetic "
        f"reference sets up to {new.max_desc / 1e6:.0f} M descriptors and extrapolated "
        f"{n_r / new.max_desc:.0f}× to a million references (`docs/scale_bench.md`); the "
        "scanned lists only grow longer there, which makes each code cheaper to scan.", "",
        "## Workload", "",
        "| quantity | arithmetic | value |", "|---|---|---|",
        f"| reference descriptors | {REFS:,} refs × {d_r:.0f} desc (measured mean; the "
        f"issue's ≈600 is the same order) | {n_r / 1e6:,.0f} M |",
        f"| query descriptors | {QUERIES:,} queries × {VIEWS} views (original, mirror) × "
        f"{d_q:.0f} desc | {n_q / 1e6:,.1f} M |",
        f"| candidate pairs to verify | {QUERIES:,} × {VIEWS} views × C={C} | {pairs:,} |",
        "", "## Measured unit costs (one core)", "",
        "| cost | value | from |", "|---|---|---|",
        f"| SIFT extraction, reference | {t_er * 1e3:.1f} ms / image | 64 devset images |",
        f"| SIFT extraction, query (+ mirror view) | {t_eq * 1e3:.1f} ms / image | 64 "
        "devset queries |",
        *unit_row(new), *unit_row(old),
        f"| IVF index memory | {new.bytes_desc:.1f} B / descriptor (32 B code + 8 B id + list "
        "padding) | populated minus empty file |",
        f"| exact search, CPU float32 | {unit_exact * 1e12:.0f} ps per (query desc × ref "
        f"desc) | {exact['ref_images']:,} references |",
        f"| verification | {t_v * 1e3:.1f} ms / candidate pair | 200 devset candidate pairs |",
        f"| feature store | {st['reference_bytes_per_image'] / 1e3:.0f} kB / reference, "
        f"{st['query_bytes_per_image'] / 1e3:.0f} kB / query | devset stores |",
        "", "## What it adds up to", "",
        "| stage | work (arithmetic) | core time | on " + GPU_NODE.name + " | on "
        + CPU_CLUSTER.name + " |", "|---|---|---|---|---|",
        f"| extraction | {REFS:,} × {t_er * 1e3:.1f} ms + {QUERIES:,} × {t_eq * 1e3:.1f} ms "
        f"| {hours(ext_core)} | {wall(ext_core, GPU_NODE)} (SIFT runs on the CPUs) | "
        f"{wall(ext_core, CPU_CLUSTER)} |",
        f"| index build (CPU path) | {n_r / 1e6:,.0f} M × {new.add_s * 1e6:.1f} µs | "
        f"{hours(add_core)} | {wall(add_core, GPU_NODE)} | {wall(add_core, CPU_CLUSTER, 1)} "
        "(one node: the index is built where the search stage starts) |",
        search_row(new, ivf_core, ""),
        search_row(old, old_core, ", before: for comparison"),
        f"| search, exact float16 on GPUs (**estimate**) | {n_q / 1e6:,.1f} M × "
        f"{n_r / 1e6:,.0f} M × 256 = {flop / 1e18:.1f} EFLOP at an assumed {gpu_tflops:.0f} "
        "TFLOPS sustained per GPU (faiss-gpu's fused k-selection; not measured) | - | "
        f"{hours(gpu_s)} | - |",
        f"| search, exact float16 on GPUs through torch (**estimate**) | {n_q / 1e6:,.1f} M × "
        f"{n_r / 1e6:,.0f} M = {n_q * n_r:.1e} distances; each costs ≈ {TORCH_BYTES} bytes "
        "of GPU memory traffic (float32 product written, one L2 pass, top-k read), so ≈ "
        f"{torch_rate:.1e} distances/s per GPU at {GPU_BANDWIDTH / 1e12:.2f} TB/s, not "
        f"measured | - | {hours(torch_s)} | - |",
        f"| search, exact on CPU (for scale) | {n_q / 1e6:,.1f} M × {n_r / 1e6:,.0f} M × "
        f"{unit_exact * 1e12:.0f} ps | {hours(exact_cpu_core)} | "
        f"{wall(exact_cpu_core, GPU_NODE)} | {wall(exact_cpu_core, CPU_CLUSTER)} |",
        f"| verification | {pairs:,} × {t_v * 1e3:.1f} ms | {hours(ver_core)} | "
        f"{wall(ver_core, GPU_NODE)} | {wall(ver_core, CPU_CLUSTER)} |",
        f"| **total, IVF search** (the local branch) | | "
        f"{hours(ext_core + add_core + ivf_core + ver_core)} | "
        f"{hours(total_gpu_ivf)} | {hours(total_cluster)} |",
        f"| **total, exact search on the 8 GPUs** (**estimate**: faiss-gpu at "
        f"{gpu_tflops:.0f} TFLOPS; {hours(total_torch_exact)} through torch at the "
        f"bandwidth bound) | | - | {hours(total_gpu_exact)} | - |",
        "", "## Memory and storage", "",
        "| item | arithmetic | size |", "|---|---|---|",
        f"| feature stores (uint8 descriptors, keypoints, thumbnails) | {REFS:,} × "
        f"{st['reference_bytes_per_image'] / 1e3:.0f} kB + {QUERIES:,} × "
        f"{st['query_bytes_per_image'] / 1e3:.0f} kB | {store_gb:,.0f} GB |",
        f"| {new.factory} index (file; RAM of a process that holds it in one part) | "
        f"{n_r / 1e6:,.0f} M × {new.bytes_desc:.1f} B | {index_gb:,.1f} GB |",
        f"| exact search on GPUs: references resident in float16 (arithmetic, not measured) "
        f"| {n_r / 1e6:,.0f} M × 256 B = {fp16_gb:,.0f} GB over {GPU_NODE.gpus} GPUs | "
        f"{fp16_gb / GPU_NODE.gpus:,.1f} GB per GPU (faiss-gpu: + {n_r * 8 / 1e9:,.1f} GB of "
        f"ids in host RAM; torch: + {n_r * 12 / 1e9 / GPU_NODE.gpus:,.1f} GB of norms and ids "
        "per GPU, + ≈ 1-2 GB of distance tiles) |",
        f"| the same index in parts of `local_search.index_part_mb` = {PART_MB:,} MiB "
        f"(the default): RAM of each process that searches | {index_gb:,.1f} GB / "
        f"{part_gb:.1f} GB | {n_parts} parts, one in memory at a time: ≤ {part_gb:.1f} GB |",
        "| exact search on CPU | one block (`local_search.block_mb`) per concurrent task | "
        "1 GB per task by default |",
        "", "## Reading an index in parts", "",
        f"A searching process holds one part at a time, so it reads all {n_parts} parts "
        "for every group of query shards it searches. Reading (deserialising) costs "
        f"{read_s_per_gb:.1f} s per GB on one core (measured: the "
        f"{load['index_bytes'] / 1e9:.1f} GB index of the largest curve point). Query shards "
        "are grouped up to a quarter of a part of float32 descriptors, and on a cluster "
        "into at least as many groups as it has workers (a worker's threads take turns on "
        "one searcher).", "",
        "| where | groups | reads (arithmetic) | core time | added to the search |",
        "|---|---|---|---|---|",
        f"| one node, Faiss threads | {n_q / 1e6:,.1f} M × 512 B / ({part_gb:.1f} GB / 4) = "
        f"{node_groups} | {node_groups} × {index_gb:,.1f} GB × {read_s_per_gb:.1f} s/GB | "
        f"{hours(node_read_core)} | {node_read_core / ivf_core:.0%} |",
        f"| {CPU_CLUSTER.name}, one-thread worker processes of ≤ {part_gb + 2:.0f} GB "
        f"| {CPU_CLUSTER.nodes} × {cluster_procs // CPU_CLUSTER.nodes} = {cluster_procs} | "
        f"{cluster_procs} × {index_gb:,.1f} GB × {read_s_per_gb:.1f} s/GB | "
        f"{hours(cluster_read_core)} | {cluster_read_core / ivf_core:.0%} |",
        "", f"On the cluster the {cluster_procs} one-thread processes search in "
        f"{hours(parted_cluster_wall)} (reads included), against "
        f"{wall(ivf_core, CPU_CLUSTER)} on all {CPU_CLUSTER.nodes * CPU_CLUSTER.cores} "
        "cores with the index in one part per node.",
        "",
    ]
    return "\n".join(lines)


NOTES = """## How to run it

**One 8-GPU node.** With a CUDA build of torch (the default PyPI wheel) the search stage
sees the GPUs and runs exact float16 search on all of them (`local_search.gpu: auto`; the
log names the backend, e.g. `torch cuda x8 fp16`); faiss-gpu, where it can be installed in
place of faiss-cpu (same API), is used first. Extraction and verification use the node's CPU
cores through local processes (`run.n_jobs: -1`). Keep the references resident: `-o
local_search.gpu_block_mb=24000` (the {fp16_per_gpu} GB per GPU fit in 80 GB with room for query
batches), so they are read and uploaded once and every query shard is searched from GPU
memory. Global descriptors and detection run one model replica on every GPU of the node in
one run (`common.devices.torch_devices`). Run `make gpu-check` on the node first: it checks
the GPU results against the CPU and measures the rates this plan only estimates. At the
bandwidth-bound estimate above, exact search through torch takes hours at this scale, the
compressed CPU index minutes: measure before choosing.

**A CPU Dask cluster.** `dask scheduler` on one node, `dask worker tcp://head:8786
--nworkers 1 --nthreads 32` on each node (same environment, repository on `PYTHONPATH`, the
image folders and the work folder on a shared file system at the same path), and every stage
with `--scheduler tcp://head:8786`. Extraction and verification spread over all 512 cores.
The search stage builds (or extends) the IVF index on the node it starts on and writes it to
the work folder. The default `local_search.index_part_mb` (7 GiB) keeps the {index_gb} GB index
in parts, of which a searching process holds one at a time (its threads take turns): run
one-thread worker processes (`--nworkers {workers} --nthreads 1` on a 128 GB node), each
searching groups of query shards and reading every part once per group (the table above).
Where a node has the memory, `-o local_search.index_part_mb=24000` on the run that builds
the index keeps it in one part that a worker's 32 threads share (`--nworkers 1 --nthreads
32`: {index_gb} GB per node, read once); the setting applies to parts as they are written,
so an index already built in parts is re-split only by deleting its `local_index` folder.

**What changes the figures.** Query descriptors scale the search linearly; the query keypoint
budget (3,000 per view) is rarely reached at the 300-pixel short side (a mean of about 500
per view, `docs/scale_bench.md`), so a lower budget would cut little. The search cost per
query descriptor grows with the codes scanned, nprobe/nlist of the references: the
16,384-list quantiser at nprobe 16 scans a quarter of what `IVF4096` at nprobe 16 does, and
finds the same copies (`docs/scale_bench.md`).

Adding references later costs only their extraction and index add (the rows above, scaled
to the new images), plus a new search of the queries; removing references costs nothing but
a rerun of the searches and verifications they appeared in.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--gpu-tflops", type=float, default=300.0,
                        help="assumed sustained fp16 brute-force throughput per GPU")
    parser.add_argument("--efficiency", type=float, default=0.8,
                        help="parallel efficiency applied to core counts")
    args = parser.parse_args()
    data = json.loads((args.work / "bench" / "scale" / "results.json").read_text())
    text = plan(data, args.gpu_tflops, args.efficiency)
    st = data["stages"]
    n_r = REFS * st["reference_desc_per_image"]
    bytes_desc = index_costs(data, LARGE, LARGE_NPROBE).bytes_desc
    part_gb = PART_MB * 2**20 / 1e9
    text += "\n" + NOTES.format(fp16_per_gpu=f"{n_r * 256 / 1e9 / GPU_NODE.gpus:.0f}",
                                index_gb=f"{n_r * bytes_desc / 1e9:.0f}",
                                workers=parted_workers(part_gb))
    write_text(REPO_ROOT / "docs" / "capacity.md", text)
    print(text)


if __name__ == "__main__":
    main()
