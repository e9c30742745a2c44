"""ISC metrics on the queries of chosen edit kinds (from a benchmark's ``edits.csv``).

    python -m evaluation.by_edit --predictions sub.csv --gt gt.csv --edits edits.csv \\
        --kinds onto_bg,occlude,pad

The ground truth is restricted to the queries whose edit chain holds any of ``--kinds`` (their
positives and their distractors); predictions for other queries are then ignored, as the metric
ignores queries outside the ground truth. Also prints each kind alone, and all queries.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence

from common.io import read_csv
from evaluation.isc_metric import GroundTruth, Metrics, evaluate, load_predictions

KIND = re.compile(r"[a-z_]+")


def edit_kinds(chain: str) -> set[str]:
    """Kinds of a chain label: ``"onto_bg0.44+jpeg30"`` -> ``{"onto_bg", "jpeg"}``."""
    return {m.group(0).rstrip("_") for m in (KIND.match(t) for t in chain.split("+")) if m}


def restrict(gt: GroundTruth, queries: Iterable[str]) -> GroundTruth:
    """The ground truth of ``queries`` only."""
    keep = frozenset(queries) & gt.queries
    return GroundTruth(keep, frozenset(p for p in gt.positives if p[0] in keep))


def subset_metrics(predictions, gt: GroundTruth, edits: dict[str, str],
                   kinds: Sequence[str]) -> tuple[int, Metrics]:
    """(number of queries, metrics) on the queries having any of ``kinds``."""
    subset = restrict(gt, [q for q, chain in edits.items() if edit_kinds(chain) & set(kinds)])
    return len(subset.queries), evaluate(predictions, subset)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--edits", required=True, help="CSV: query_id,edits (edit chain labels)")
    p.add_argument("--kinds", required=True, help="comma-separated edit kinds, e.g. onto_bg,pad")
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
    rows = [("+".join(kinds), *subset_metrics(predictions, gt, edits, kinds))]
    rows += [(k, *subset_metrics(predictions, gt, edits, [k])) for k in kinds if len(kinds) > 1]
    rows.append(("all", len(gt.queries), evaluate(predictions, gt)))
    print(f"{'queries':<24}{'n':>5}{'pos':>5}{'micro-AP':>10}{'R@P90':>8}{'R@1':>8}")
    for name, n, m in rows:
        print(f"{name:<24}{n:>5}{m.n_positives:>5}{m.micro_ap:>10.4f}{m.recall_at_p90:>8.4f}"
              f"{m.recall_at_rank1:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
