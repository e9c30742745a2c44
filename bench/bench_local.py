"""Benchmark of the local branch: per-stage throughput and peak memory, and the SIFT stage's
time against a bare ``cv2.imread`` + SIFT loop over the same images in the same run.

    python -m bench.bench_local [--queries DIR] [--references DIR] [--work DIR]

Defaults to ../shared/devset. The overhead ratio compares one process with one process
(``--n-jobs 1`` for the pipeline); the stage table then runs every stage with all cores.
Peak memory is the resident memory of each stage's whole process tree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.memory import Measured, measure
from common.config import REPO_ROOT, load_config

DEVSET = REPO_ROOT.parent / "shared" / "devset"
OVERHEAD_LIMIT = 1.15


def stage_commands(query: Path, ref: Path, work: Path, out: Path) -> list[tuple[str, list[str]]]:
    sets = ["--queries", str(query), "--references", str(ref)]
    return [
        ("extract references", ["local_fea.extract", "--images", str(ref)]),
        ("extract queries", ["local_fea.extract", "--images", str(query), "--mirror"]),
        ("search", ["local_fea.search", *sets]),
        ("verify", ["match_score.verify", *sets]),
        ("merge", ["merge.fuse", *sets, "--out", str(out), "-o", "merge.branches=[local]",
                   "-o", "merge.method=max"]),  # the local branch's submission
    ]


def run_module(args: list[str], work: Path, *extra: str) -> Measured:
    result = measure([sys.executable, "-m", *args, "--work", str(work), *extra], cwd=REPO_ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {result.returncode})")
    return result


def count_rows(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f) - 1


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
    n_refs = sum(1 for p in args.references.iterdir() if p.is_file())
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

    print("Stages with all cores")
    full = work / "full"
    submission = full / "submission.csv"
    rows = []
    for name, cmd in stage_commands(args.queries, args.references, full, submission):
        result = run_module(cmd, full)
        rows.append((name, result, result.stdout.strip().splitlines()[-1]))
    units = {"extract references": (n_refs, "img"), "extract queries": (n_queries, "img"),
             "search": (n_queries, "query")}
    pairs_csv = Path(rows[3][2])
    units["verify"] = (count_rows(pairs_csv), "pair")
    units["merge"] = (count_rows(submission), "row")
    print(f"  {'stage':20s} {'seconds':>8s} {'throughput':>16s} {'peak RSS':>10s}")
    report = {"overhead_ratio": ratio, "bare_s": bare_s, "single_s": single_s}
    for name, result, _ in rows:
        n, unit = units[name]
        rate = f"{n / result.seconds:8.1f} {unit}/s"
        print(f"  {name:20s} {result.seconds:8.1f} {rate:>16s} {result.peak_rss_mb:8.0f} MB")
        report[name] = {"seconds": result.seconds, "count": n, "unit": unit,
                        "peak_rss_mb": result.peak_rss_mb}
    (work / "bench_local.json").write_text(json.dumps(report, indent=1))
    print(f"\nfigures in {work / 'bench_local.json'}")


if __name__ == "__main__":
    main()
