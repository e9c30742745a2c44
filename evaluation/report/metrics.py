"""Metrics: reads the branches' pairs files and the edits CSV; returns scores and table rows."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError
from evaluation.isc_metric import MAX_PAIRS, GroundTruth, Metrics, Predictions, evaluate
from evaluation.report.record import ordered_branches

log = logging.getLogger(__name__)


def _best_per_pair(path: Path) -> dict[tuple[str, str], float]:
    """A branch's own score of each pair: the best over its rows (query views)."""
    best: dict[tuple[str, str], float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            pair = (row["query_id"], row["reference_id"])
            score = float(row["score"])
            if np.isfinite(score) and score > best.get(pair, -np.inf):
                best[pair] = score
    return best



def branch_scores(record: dict[str, Any]) -> dict[str, dict[tuple[str, str], float]]:
    """Every branch's own best score per pair, for the branches whose pairs file reads."""
    scores = {}
    for name, entry in ordered_branches(record):
        try:
            scores[name] = _best_per_pair(Path(entry["pairs"]))
        except (OSError, KeyError, TypeError, ValueError) as e:
            log.warning("branch %s: pairs not read (%s)", name, e)
    return scores


def as_predictions(scores: dict[tuple[str, str], float]) -> Predictions:
    """A branch's pairs as a submission: best first, at most the ISC cap."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_PAIRS]
    return Predictions(np.array([q for (q, _), _ in ranked], dtype=str),
                       np.array([r for (_, r), _ in ranked], dtype=str),
                       np.array([s for _, s in ranked], dtype=np.float64))


def metric_row(name: str, m: Metrics) -> dict[str, Any]:
    return {"name": name, **m.to_dict()}


def labels_of(pred: Predictions, gt: GroundTruth) -> np.ndarray:
    """Per prediction: 1 copy, 0 non-copy, -1 query not in the ground truth."""
    out = np.full(len(pred), -1, np.int8)
    for i, (q, r) in enumerate(zip(pred.query_ids.tolist(), pred.reference_ids.tolist(),
                                   strict=True)):
        if q in gt.queries:
            out[i] = int((q, r) in gt.positives)
    return out


def edit_table(pred: Predictions, gt: GroundTruth, edits: Path) -> list[dict[str, Any]]:
    """The fused metrics on the queries of each edit kind, then on all queries."""
    from common.io import read_csv
    from evaluation.by_edit import edit_kinds, restrict

    try:
        chains = {r["query_id"]: r["edits"] for r in read_csv(edits)}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the edits {edits}: {e}") from None
    by_kind: dict[str, list[str]] = defaultdict(list)
    for q, chain in chains.items():
        for kind in edit_kinds(chain):
            by_kind[kind].append(q)
    rows = []
    for kind, queries in [*sorted(by_kind.items()), ("all", list(gt.queries))]:
        subset = restrict(gt, queries)
        m = evaluate(pred, subset) if subset.n_positives else None
        rows.append({"kind": kind, "queries": len(subset.queries),
                     "copies": subset.n_positives, "m": m and m.to_dict()})
    return rows
