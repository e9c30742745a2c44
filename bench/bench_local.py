"""Benchmark of the local branch: per-stage throughput (from the pipeline's run record) and peak
memory, and the SIFT stage's time against a bare ``cv2.imread`` + SIFT loop over the same
images in the same run.

    python -m bench.bench_local [--queries DIR] [--references DIR] [--work DIR]

Defaults to ../shared/devset. The overhead ratio compares one process with one process
(``--n-jobs 1`` for the pipeline); the stage table then runs the pipeline's local branch with
all cores (``copydet run -o merge.branches=[local]``). Peak memory is the resident memory of
the run's whole process tree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.memory import Measured, measure
from common.config import REPO_ROOT, load_config
from common.shards import ShardStore

DEVSET = REPO_ROOT.parent / "shared" / "devset"
OVERHEAD_LIMIT = 1.15


def run_module(args: list[str], work: Path, *extra: str) -> Measured:
    result = measure([sys.executable, "-m", *args, "--work", str(work), *extra], cwd=REPO_ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {result.returncode})")
    return result


def count_rows(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f) - 1


def count_images(store: str) -> int:
    return len(ShardStore(store))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=Path, default=DEVSET / "queries")
    parser.add_argument("--references", type=Path, default=DEVSET / "references")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--ratio-images", type=int, default=500,
                        help="reference images used for the overhead ratio")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for the ratio")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_local-"))
    conf = load_config()["local_fea"]
    n_queries = sum(1 for p in args.queries.iterdir() if p.is_file())

    ratio_refs = work / "ratio-references"
    sample = sorted(p for p in args.references.iterdir() if p.is_file())[:args.ratio_images]
    ratio_refs.mkdir(parents=True, exist_ok=True)
    for path in sample:
        if not (ratio_refs / path.name).exists():
            (ratio_refs / path.name).symlink_to(path.resolve())
    print(f"SIFT stage vs bare loop on {len(sample)} reference images, one process each, "
          f"{args.rounds} alternating rounds (best of each)")
    bare_s, single_s = [], []
    for round_ in range(args.rounds):
        bare_s.append(measure([sys.executable, "-m", "bench.bare_sift", str(ratio_refs),
                               "--short-side", str(conf["short_side"]),
                               "--max-keypoints", str(conf["max_keypoints"])],
                              cwd=REPO_ROOT).seconds)
        single_s.append(run_module(["local_fea.extract", "--images", str(ratio_refs)],
                                   work / f"single-{round_}", "--n-jobs", "1").seconds)
    bare, single = min(bare_s), min(single_s)
    ratio = single / bare
    print(f"  bare cv2.imread + SIFT loop  {bare:7.1f} s  {len(sample) / bare:6.1f} img/s")
    print(f"  pipeline, --n-jobs 1         {single:7.1f} s  {len(sample) / single:6.1f} img/s")
    verdict = "OK" if ratio <= OVERHEAD_LIMIT else "OVER"
    print(f"  ratio pipeline / bare        {ratio:7.3f}  (limit {OVERHEAD_LIMIT}: {verdict})\n")

    print("Local branch with all cores (copydet run)")
    full = work / "full"
    submission = full / "submission.csv"
    result = run_module(["copydet", "run", "--queries", str(args.queries), "--references",
                         str(args.references), "--out", str(submission), "-o",
                         "merge.branches=[local]", "-o", "merge.method=max"], full)
    record = json.loads((full / "pipeline.json").read_text())
    pairs = Path(record["branches"]["local"]["pairs"])
    units = {"local_fea.extract": None, "local_fea.search": (n_queries, "query"),
             "match_score.verify": (count_rows(pairs), "pair"),
             "merge.fuse": (count_rows(submission), "row")}
    print(f"  {'stage':34s} {'seconds':>8s} {'throughput':>16s}")
    report = {"overhead_ratio": ratio, "bare_s": bare_s, "single_s": single_s,
              "peak_rss_mb": result.peak_rss_mb, "stages": record["stages"]}
    for stage in record["stages"]:
        n, unit = units[stage["stage"]] or (count_images(stage["output"]), "img")
        seconds = max(stage["seconds"], 1e-9)
        rate = f"{n / seconds:8.1f} {unit}/s"
        print(f"  {stage['stage'] + ' ' + stage['label']:34s} {seconds:8.1f} {rate:>16s}")
    print(f"  whole run: {result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB")
    (work / "bench_local.json").write_text(json.dumps(report, indent=1))
    print(f"\nfigures in {work / 'bench_local.json'}")


if __name__ == "__main__":
    main()
