"""Metrics of a deduplication against true groups (``data.make_dedupe``'s ``groups.csv``).

    python -m evaluation.dedupe --truth work/dedupe-bench/groups.csv --out work/ddb/dedupe/<set>

- pairwise precision, recall and F1 of the groups: the pairs of images put in one group
  against the pairs of copies of one photo;
- micro-AP over unordered pairs ranked by score (ties broken pessimistically, as
  ``evaluation.isc_metric``), every copy pair counted whether listed or not;
- recall at precision 0.9 and the score there (the operating threshold ``dedupe.threshold``
  is that score on the project's benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from common.io import read_csv
from dedupe.groups import GROUPS, PAIRS, read_pairs
from evaluation.isc_metric import average_precision, precision_recall_curve, recall_at_precision

Pair = tuple[str, str]


def group_pairs(groups: Iterable[Iterable[str]]) -> set[Pair]:
    """Every unordered pair of images within one group."""
    return {tuple(sorted(p)) for g in groups for p in combinations(sorted(set(g)), 2)}


def true_groups(truth: Path) -> list[list[str]]:
    """The groups of a ``groups.csv`` (``image,group,…``: a benchmark's, or an output's)."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for row in read_csv(truth):
        by_group[row["group"]].append(row["image"])
    return list(by_group.values())


def pairwise_prf(predicted: Iterable[Iterable[str]], truth: set[Pair]) -> dict[str, float]:
    """Pairwise precision, recall and F1 of predicted groups."""
    found = group_pairs(predicted)
    tp = len(found & truth)
    precision = tp / len(found) if found else 1.0
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ranked_metrics(pairs: Sequence[tuple[str, str, float]], truth: set[Pair]) -> dict:
    """Micro-AP over unordered pairs, recall at precision 0.9 and the score there."""
    best: dict[Pair, float] = {}
    for a, b, s in pairs:
        if a != b:
            k = tuple(sorted((a, b)))
            best[k] = max(s, best.get(k, -np.inf))
    if not best or not truth:
        return {"micro_ap": 0.0, "recall_p90": 0.0, "score_p90": None}
    labels = np.array([p in truth for p in best], bool)
    curve = precision_recall_curve(labels, np.array(list(best.values()), np.float64), len(truth))
    recall, score = recall_at_precision(curve, 0.9)
    return {"micro_ap": average_precision(curve), "recall_p90": recall, "score_p90": score}


def evaluate(pairs: Sequence[tuple[str, str, float]], groups: Iterable[Iterable[str]],
             truth: Path) -> dict:
    """All the metrics of the module docstring, for ``pairs`` and ``groups``."""
    true_pairs = group_pairs(true_groups(truth))
    return {**pairwise_prf(groups, true_pairs), **ranked_metrics(pairs, true_pairs),
            "n_true_pairs": len(true_pairs)}


def read_output(out: Path) -> tuple[list[tuple[str, str, float]], list[list[str]]]:
    """The pairs and groups of a ``copydet dedupe`` output folder."""
    return read_pairs(out / PAIRS), true_groups(out / GROUPS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--truth", type=Path, required=True, help="the benchmark's groups.csv")
    parser.add_argument("--out", type=Path, required=True,
                        help="a `copydet dedupe` output folder (pairs.csv, groups.csv)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(*read_output(args.out), args.truth), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
