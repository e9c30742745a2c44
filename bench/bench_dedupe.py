"""Deduplication benchmark: ``copydet dedupe`` and the peer tools on one folder, one table.

    make dedupe-bench     # builds work/dedupe-bench (data.make_dedupe), then runs this
    python -m bench.bench_dedupe [--bench work/dedupe-bench] [--work work/bench-dedupe]

Every tool gets the same ``images/`` folder on this machine, each timed from a cold start
(our work folder is emptied first) with its peak memory; the peers run in their own virtual
environments under ``.peers/<tool>`` (``bench.peers``), with every network connection
refused, and a peer not installed there is listed as such. Metrics (``evaluation.dedupe``):
pairwise precision, recall and F1 of the groups, micro-AP over unordered pairs. Our row is
given with the configured grouping and, regrouped from the same pairs, with plain connected
components at the same threshold. Results go to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.memory import measure
from common.config import REPO_ROOT, load_config
from dedupe.groups import make_groups, read_pairs
from evaluation.dedupe import evaluate, read_output

SWEEP = (0.1, 0.2, 0.3, 0.6, 0.8)  # thresholds of the star / components comparison, and ours
PEERS = {"imagededup (PHash)": ("imagededup", "imagededup_phash"),
         "cleanvision": ("cleanvision", "cleanvision_near"),
         "fastdup": ("fastdup", "fastdup_cc")}
NO_NETWORK = REPO_ROOT / "tests" / "no_network"


def ours(images: Path, work: Path, truth: Path) -> list[dict]:
    """``copydet dedupe`` from scratch: its row, and its pairs regrouped by components."""
    shutil.rmtree(work / "ours", ignore_errors=True)
    out = work / "ours" / "out"
    run = measure([str(Path(sys.executable).with_name("copydet")), "dedupe", "--images",
                   str(images), "--work", str(work / "ours"), "--out", str(out)], cwd=REPO_ROOT)
    if run.returncode:
        raise SystemExit(f"copydet dedupe failed (exit {run.returncode})")
    pairs, groups = read_output(out)
    section = load_config()["dedupe"]
    components = make_groups(read_pairs(out / "pairs.csv"), section["threshold"], {},
                             "components")
    label = f"copydet dedupe (threshold {section['threshold']}"
    return [{"tool": f"{label}, {section['grouping']})", "seconds": run.seconds,
             "peak_rss_mb": run.peak_rss_mb, **evaluate(pairs, groups, truth),
             "largest_group": max(map(len, groups), default=0)},
            {"tool": f"{label}, connected components)", "seconds": None, "peak_rss_mb": None,
             **evaluate(pairs, components, truth),
             "largest_group": max(map(len, components), default=0)}]


def peer(name: str, venv: str, script: str, images: Path, work: Path, peers: Path,
         truth: Path) -> dict:
    """One peer tool's row (``bench.peers.<script>`` in ``<peers>/<venv>``)."""
    python = peers / venv / "bin" / "python"
    if not python.exists():
        return {"tool": name, "error": f"not installed ({python} missing)"}
    out = work / f"{venv}.json"
    run = measure([str(python), str(REPO_ROOT / "bench" / "peers" / f"{script}.py"),
                   str(images.resolve()), str(out)], cwd=work,
                  env={"PYTHONPATH": str(NO_NETWORK), "PATH": "/usr/bin:/bin",
                       "HOME": str(work)})
    if run.returncode or not out.exists():
        return {"tool": name, "error": f"failed (exit {run.returncode})"}
    found = json.loads(out.read_text())
    pairs = [(a, b, float(s)) for a, b, s in found["pairs"]]
    return {"tool": name, "seconds": run.seconds, "peak_rss_mb": run.peak_rss_mb,
            **evaluate(pairs, found["groups"], truth),
            "largest_group": max(map(len, found["groups"]), default=0)}


def sweep(out: Path, truth: Path) -> str:
    """Star groups against connected components of the same pairs, threshold by threshold:
    pairwise F1 and the largest group."""
    pairs = read_pairs(out / "pairs.csv")
    lines = ["| threshold | star F1 | star largest group | components F1 | components largest "
             "group |", "|---|---|---|---|---|"]
    for t in sorted({*SWEEP, load_config()["dedupe"]["threshold"]}):
        cells = []
        for grouping in ("star", "components"):
            groups = make_groups(pairs, t, {}, grouping)
            f1 = evaluate([], groups, truth)["f1"]
            cells += [f"{f1:.3f}", str(max(map(len, groups), default=0))]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| tool | pairwise P | R | F1 | micro-AP (pairs) | largest group | time (s) | "
             "peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['error']} | | | | | | |")
            continue
        time = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['tool']} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['f1']:.3f} | {r['micro_ap']:.3f} | {r['largest_group']} | {time} | "
                     f"{rss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=REPO_ROOT / "work" / "dedupe-bench")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "work" / "bench-dedupe")
    parser.add_argument("--peers", type=Path, default=REPO_ROOT / ".peers")
    args = parser.parse_args(argv)
    images, truth = args.bench.resolve() / "images", args.bench.resolve() / "groups.csv"
    args.work = args.work.resolve()  # the peers run in it: a relative path would move
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in args.work.glob("*.json"):  # a peer that fails must not leave an old answer
        stale.unlink()
    rows = ours(images, args.work, truth)
    rows += [peer(name, venv, script, images, args.work, args.peers, truth)
             for name, (venv, script) in PEERS.items()]
    (args.work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    n = len(list(images.iterdir()))
    print(f"{n} images, {rows[0]['n_true_pairs']} copy pairs ({args.bench})\n")
    print(table(rows))
    print(f"\n{sweep(args.work / 'ours' / 'out', truth)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
