"""Detector quality on a held-out synthetic split: box recall at IoU 0.5, false-fire rate.

    copydet detector-eval --data work/overlay_synth --split test [--json out.json]

Runs the detection stage's own code (``Detector``, ``select_box``, ``used_for``) over the
split's samples (``preprocess.synth``) and reports, for each branch threshold:

- ``recall``: pasted copies whose chosen box overlaps the true box with IoU >= 0.5, among the
  copies whose true box passes the shape tests (a copy filling 90% of a padded frame is meant
  to stay uncropped);
- ``detector_recall``: the same over all copies, with the most confident box of any shape;
- ``false_fire``: samples with nothing pasted that get a crop anyway.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common import cli
from common.io import read_csv, write_json
from common.parallel import resolve_n_jobs
from preprocess.detect import BRANCHES, STAGE, Box, Detector, select_box, used_for


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    union = a.width * a.height + b.width * b.height - w * h
    return w * h / union if union > 0 else 0.0


def evaluate(conf: dict[str, Any], data: str | Path, split: str = "test",
             batch: int = 64) -> dict[str, Any]:
    """Recall and false-fire figures of the configured detector on one synthetic split."""
    data = Path(data)
    data = data.parent if data.suffix == ".yaml" else data
    pconf = conf[STAGE]
    rows = [r for r in read_csv(data / "samples.csv") if r["split"] == split]
    detector = Detector(pconf, resolve_n_jobs(conf["run"]["n_jobs"]))
    counts: dict[str, float] = {}
    kinds: dict[str, list[int]] = {}

    def add(key: str, value: float = 1) -> None:
        counts[key] = counts.get(key, 0) + value

    for start in tqdm(range(0, len(rows), batch), desc=f"evaluate {split}", unit="batch"):
        chunk = rows[start:start + batch]
        smalls = [detector.small(data / "images" / split / f"{r['name']}.jpg") for r in chunk]
        found = detector.detect([s for s, _ in smalls], [size for _, size in smalls])
        for row, (_, size), boxes in zip(chunk, smalls, found, strict=True):
            chosen = select_box(boxes, size, pconf)
            branches = used_for(chosen, pconf)
            if not row["x1"]:
                add("negatives")
                for b in branches:
                    add(f"false_fire_{b}")
                continue
            truth = Box(*(float(row[k]) for k in ("x1", "y1", "x2", "y2")), 1.0)
            add("positives")
            top = max(boxes, key=lambda b: b.conf, default=None)
            for b in BRANCHES:
                if top is not None and top.conf > pconf[f"conf_{b}"] and iou(top, truth) >= 0.5:
                    add(f"detector_hit_{b}")
            if select_box([truth], size, {**pconf, "min_conf": 0}) is None:
                continue
            add("croppable")
            hit = chosen is not None and iou(chosen, truth) >= 0.5
            kinds.setdefault(row["kind"], [0, 0])[0] += hit and "local" in branches
            kinds[row["kind"]][1] += 1
            for b in branches:
                add(f"hit_{b}", hit)
    pos, neg, crop = (max(1, counts.get(k, 0)) for k in ("positives", "negatives", "croppable"))
    report: dict[str, Any] = {
        "split": split, "samples": len(rows), "positives": int(counts.get("positives", 0)),
        "croppable_positives": int(counts.get("croppable", 0)),
        "negatives": int(counts.get("negatives", 0)),
        "recall_by_kind_local": {k: round(h / n, 4) for k, (h, n) in sorted(kinds.items())},
    }
    for b in BRANCHES:
        report[f"recall_{b}"] = round(counts.get(f"hit_{b}", 0) / crop, 4)
        report[f"detector_recall_{b}"] = round(counts.get(f"detector_hit_{b}", 0) / pos, 4)
        report[f"false_fire_{b}"] = round(counts.get(f"false_fire_{b}", 0) / neg, 4)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="synthetic set (preprocess.synth)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def call(conf: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    report = evaluate(conf, args.data, args.split)
    if args.json:
        write_json(args.json, report)
    return report


COMMAND = cli.Command("detector-eval", __doc__, add_arguments, call)

if __name__ == "__main__":
    cli.run_module("preprocess.evaluate")
