"""ISC metrics on the queries of chosen edit kinds (from a benchmark's ``edits.csv``).

    python -m evaluation.by_edit --predictions sub.csv --gt gt.csv --edits edits.csv \\
        --kinds onto_bg,occlude,pad

The ground truth is restricted to the queries whose edit chain holds any of ``--kinds`` (their
positives and their distractors); predictions for other queries are then ignored, as the metric
ignores queries outside the ground truth. Also prints each kind alone, and all queries.

``--above T`` adds a column: the pairs that are not copies scoring ``T`` or more, per 100
queries of the row (give T = the score at precision 0.9 on another set, e.g. the devset's
``threshold_at_p90``: how many false accusations that operating point makes here).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from common.io import read_csv
from evaluation.isc_metric import GroundTruth, Metrics, Predictions, evaluate, load_predictions

KIND = re.compile(r"[a-z_]+")


def edit_kinds(chain: str) -> set[str]:
    """Kinds of a chain label: ``"onto_bg0.44+jpeg30"`` -> ``{"onto_bg", "jpeg"}``."""
    return {m.group(0).rstrip("_") for m in (KIND.match(t) for t in chain.split("+")) if m}


def restrict(gt: GroundTruth, queries: Iterable[str]) -> GroundTruth:
    """The ground truth of ``queries`` only."""
    keep = frozenset(queries) & gt.queries
    return GroundTruth(keep, frozenset(p for p in gt.positives if p[0] in keep))


def with_kinds(gt: GroundTruth, edits: dict[str, str], kinds: Sequence[str]) -> GroundTruth:
    """The ground truth of the queries whose edit chain has any of ``kinds``."""
    return restrict(gt, [q for q, chain in edits.items() if edit_kinds(chain) & set(kinds)])


def subset_metrics(predictions, gt: GroundTruth, edits: dict[str, str],
                   kinds: Sequence[str]) -> tuple[int, Metrics]:
    """(number of queries, metrics) on the queries having any of ``kinds``."""
    subset = with_kinds(gt, edits, kinds)
    return len(subset.queries), evaluate(predictions, subset)


def false_per_100(predictions: Predictions, gt: GroundTruth, threshold: float) -> float:
    """Predicted pairs of ``gt``'s queries that are not copies and score ``threshold`` or more,
    per 100 queries."""
    wanted = np.isin(predictions.query_ids, list(gt.queries)) & (predictions.scores >= threshold)
    false = sum((q, r) not in gt.positives for q, r in zip(
        predictions.query_ids[wanted], predictions.reference_ids[wanted], strict=True))
    return 100.0 * false / max(len(gt.queries), 1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--edits", required=True, help="CSV: query_id,edits (edit chain labels)")
    p.add_argument("--kinds", required=True, help="comma-separated edit kinds, e.g. onto_bg,pad")
    p.add_argument("--above", type=float,
                   help="also count the non-copy pairs scoring this or more, per 100 queries")
    args = p.parse_args(argv)
    from evaluation.isc_metric import load_ground_truth

    gt, predictions = load_ground_truth(args.gt), load_predictions(args.predictions)
    edits = {r["query_id"]: r["edits"] for r in read_csv(args.edits)}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    known = set().union(*map(edit_kinds, edits.values()))
    unknown = sorted(set(kinds) - known)
    if unknown:
        p.error(f"no query of {args.edits} has the edit kind(s) {unknown}; its kinds: "
                f"{', '.join(sorted(known))}")
    subsets = [("+".join(kinds), kinds)] + [(k, [k]) for k in kinds if len(kinds) > 1]
    rows = [(name, with_kinds(gt, edits, ks)) for name, ks in subsets] + [("all", gt)]
    above = "" if args.above is None else f"{'false/100q':>12}"
    print(f"{'queries':<24}{'n':>5}{'pos':>5}{'micro-AP':>10}{'R@P90':>8}{'R@1':>8}{above}")
    for name, sub in rows:
        extra = ("" if args.above is None
                 else f"{false_per_100(predictions, sub, args.above):>12.2f}")
        if not sub.positives:  # distractors only (look-alikes): no recall to speak of
            print(f"{name:<24}{len(sub.queries):>5}{0:>5}{'-':>10}{'-':>8}{'-':>8}{extra}")
            continue
        m = evaluate(predictions, sub)
        print(f"{name:<24}{len(sub.queries):>5}{m.n_positives:>5}{m.micro_ap:>10.4f}"
              f"{m.recall_at_p90:>8.4f}{m.recall_at_rank1:>8.4f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
