"""ISC2021 / DISC21 matching-track metrics: micro-AP, recall at precision 0.9, recall@rank-1.

The ranking and AP follow the official evaluation (facebookresearch/isc2021, ``isc/metrics.py``):

* the predicted pairs of all queries are pooled and ranked by decreasing score; within equal
  scores the false positives come first (pessimistic ties), so giving many pairs one score
  cannot raise the AP;
* micro-AP is the sum over ranks of ``(recall_i - recall_{i-1}) * precision_i`` (no
  interpolation), i.e. the mean over all ground-truth positive pairs of the precision at the rank
  where each one is found, a positive never predicted contributing 0; the denominator of the
  recall is therefore the number of ground-truth positive pairs, predicted or not;
* recall at precision 0.9 is the highest recall over the ranks whose precision is >= 0.9
  (reported as 0, threshold ``None``, if no rank reaches it).

Deliberate differences from the official code:

* predictions for queries absent from the ground truth are ignored (the official code counts
  them as false positives); predictions for distractor queries are false positives as usual;
* recall@rank-1 is counted per query: a query with positives is a hit when its single top-scored
  prediction (ties pessimistic: a false positive with the top score wins) is any of its
  positives; the denominator is the number of queries with at least one positive. The official
  code counts per positive pair instead; both agree when every query has at most one positive,
  as in DISC21.

Command line::

    python -m evaluation.isc_metric --predictions sub.csv --gt gt.csv \\
        [--plot pr.png] [--json metrics.json] [--max-pairs N]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.io import atomic_path, write_json

GT_HEADER = ("query_id", "reference_id")
PREDICTION_HEADER = ("query_id", "reference_id", "score")
MAX_PAIRS = 500_000
TARGET_PRECISION = 0.9


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GroundTruth:
    """All ground-truth queries (distractors included) and the set of positive pairs."""

    queries: frozenset[str]
    positives: frozenset[tuple[str, str]]

    def __post_init__(self) -> None:
        stray = {q for q, _ in self.positives} - self.queries
        if stray:
            raise ValueError(f"positive pairs for queries not listed: {sorted(stray)[:3]}")

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str | None]]) -> GroundTruth:
        """Build from ``(query, reference)`` pairs; a ``None`` or empty reference = distractor."""
        items = ((f"pair {i}", q, r or "") for i, (q, r) in enumerate(pairs, 1))
        return _build_ground_truth(items)

    @property
    def n_positives(self) -> int:
        return len(self.positives)

    @property
    def positive_queries(self) -> frozenset[str]:
        return frozenset(q for q, _ in self.positives)


@dataclass(frozen=True)
class Predictions:
    """Predicted pairs as parallel 1-D arrays; scores are finite, higher = more confident."""

    query_ids: np.ndarray
    reference_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_ids", np.asarray(self.query_ids, dtype=str))
        object.__setattr__(self, "reference_ids", np.asarray(self.reference_ids, dtype=str))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float64))
        shapes = {a.shape for a in (self.query_ids, self.reference_ids, self.scores)}
        if len(shapes) != 1 or self.scores.ndim != 1:
            raise ValueError(f"predictions need three 1-D arrays of one length, got {shapes}")
        if not np.all(np.isfinite(self.scores)):
            bad = int(np.flatnonzero(~np.isfinite(self.scores))[0])
            raise ValueError(f"prediction {bad + 1} has a non-finite score {self.scores[bad]}")
        _check_no_duplicate_pair(self.query_ids.tolist(), self.reference_ids.tolist())

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, float]]) -> Predictions:
        """Build from ``(query, reference, score)`` rows."""
        items = ((f"row {i}", q, r, str(s)) for i, (q, r, s) in enumerate(rows, 1))
        return _build_predictions(items)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall after each rank of the pessimistic ranking, and the rank's score."""

    precisions: np.ndarray
    recalls: np.ndarray
    thresholds: np.ndarray


@dataclass(frozen=True)
class Metrics:
    """Matching-track metrics; ``curve`` holds the precision-recall curve for plotting."""

    micro_ap: float
    recall_at_p90: float
    threshold_at_p90: float | None
    recall_at_rank1: float
    n_predictions: int  # pairs in the submission
    n_evaluated: int  # pairs whose query is in the ground truth
    n_ignored: int  # pairs whose query is not in the ground truth
    n_true_positives: int  # evaluated pairs that are ground-truth positives
    n_positives: int  # ground-truth positive pairs (the recall denominator)
    n_positive_queries: int  # queries with >= 1 positive (the recall@rank-1 denominator)
    curve: PRCurve = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | None]:
        """The scalar metrics, ready for JSON."""
        return {k: v for k, v in vars(self).items() if k != "curve"}


# --------------------------------------------------------------------------- reading


def _read_rows(path: str | os.PathLike, header: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Yield ``("line N", cells)`` for the data rows of a CSV whose header must be ``header``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            first = next(reader, None)
            if first is None or [c.strip() for c in first] != list(header):
                got = "empty file" if first is None else repr(",".join(first))
                raise ValueError(f"{path}: header must be {','.join(header)!r}, got {got}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}: line {reader.line_num}: expected {len(header)} columns, "
                        f"got {len(row)}"
                    )
                yield f"{path}: line {reader.line_num}", [c.strip() for c in row]
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: {e}") from e


def _build_ground_truth(items: Iterable[tuple[str, str, str]]) -> GroundTruth:
    """Build ground truth from ``(location, query, reference)``; '' reference = distractor."""
    queries: set[str] = set()
    positives: dict[tuple[str, str], str] = {}
    distractor_at: dict[str, str] = {}
    positive_at: dict[str, str] = {}
    for where, q, r in items:
        if not q:
            raise ValueError(f"{where}: empty query_id")
        queries.add(q)
        seen = distractor_at if not r else positive_at
        seen.setdefault(q, where)
        if q in distractor_at and q in positive_at:
            raise ValueError(
                f"{where}: query {q!r} is both a distractor ({distractor_at[q]}) "
                f"and matched ({positive_at[q]})"
            )
        if r and positives.setdefault((q, r), where) != where:
            raise ValueError(f"{where}: duplicate pair ({q}, {r}), first at {positives[(q, r)]}")
    return GroundTruth(frozenset(queries), frozenset(positives))


def _parse_score(where: str, text: str) -> float:
    try:
        score = float(text)
    except ValueError:
        raise ValueError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(score):
        raise ValueError(f"{where}: score {text!r} is not a finite number")
    return score


def _build_predictions(items: Iterable[tuple[str, str, str, str]]) -> Predictions:
    """Build predictions from ``(location, query, reference, score text)``, validating each."""
    queries: list[str] = []
    refs: list[str] = []
    scores: list[float] = []
    first_at: dict[tuple[str, str], str] = {}
    for where, q, r, s in items:
        if not q or not r:
            raise ValueError(f"{where}: empty {'query_id' if not q else 'reference_id'}")
        scores.append(_parse_score(where, s))
        if first_at.setdefault((q, r), where) != where:
            raise ValueError(f"{where}: duplicate pair ({q}, {r}), first at {first_at[(q, r)]}")
        queries.append(q)
        refs.append(r)
    return Predictions(np.array(queries, dtype=str), np.array(refs, dtype=str), np.array(scores))


def _check_no_duplicate_pair(queries: list[str], refs: list[str]) -> None:
    first: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(zip(queries, refs, strict=True)):
        j = first.setdefault(pair, i)
        if j != i:
            q, r = pair
            raise ValueError(f"duplicate pair ({q}, {r}) at predictions {j + 1} and {i + 1}")


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Read a ``query_id,reference_id`` CSV; an empty reference_id marks a distractor query."""
    return _build_ground_truth((where, q, r) for where, (q, r) in _read_rows(path, GT_HEADER))


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read a ``query_id,reference_id,score`` CSV; raise ValueError (one line) on bad content."""
    rows = _read_rows(path, PREDICTION_HEADER)
    return _build_predictions((where, q, r, s) for where, (q, r, s) in rows)


# --------------------------------------------------------------------------- metrics


def pessimistic_order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices by decreasing score; within equal scores, false positives before true ones."""
    return np.lexsort((labels.astype(np.int8), -scores))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray, n_positives: int) -> PRCurve:
    """Precision/recall after each rank of the pooled pessimistic ranking."""
    order = pessimistic_order(scores, labels)
    n_tp = np.cumsum(labels[order], dtype=np.int64)
    ranks = np.arange(1, len(order) + 1)
    return PRCurve(n_tp / ranks, n_tp / n_positives, scores[order])


def average_precision(curve: PRCurve) -> float:
    """Non-interpolated AP: sum of recall increments times the precision where they occur."""
    gains = np.diff(curve.recalls, prepend=0.0)
    return float(np.sum(gains * curve.precisions))


def recall_at_precision(curve: PRCurve, min_precision: float) -> tuple[float, float | None]:
    """Highest recall over ranks with precision >= ``min_precision``, and that rank's score."""
    valid = np.flatnonzero(curve.precisions >= min_precision)
    if valid.size == 0:
        return 0.0, None
    best = valid[np.argmax(curve.recalls[valid])]
    return float(curve.recalls[best]), float(curve.thresholds[best])


def recall_at_rank1(
    query_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, n_positive_queries: int
) -> float:
    """Fraction of queries with positives whose top prediction (ties pessimistic) is positive."""
    if len(scores) == 0:
        return 0.0
    _, codes = np.unique(query_ids, return_inverse=True)
    order = np.lexsort((labels.astype(np.int8), -scores, codes))
    sorted_codes = codes[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    return int(labels[order][is_first].sum()) / n_positive_queries


def _label(predictions: Predictions, gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """Masks: prediction's query is in the ground truth; prediction is a positive pair."""
    n = len(predictions)
    queries = predictions.query_ids.tolist()
    refs = predictions.reference_ids.tolist()
    known = np.fromiter((q in gt.queries for q in queries), dtype=bool, count=n)
    pairs = zip(queries, refs, strict=True)
    positive = np.fromiter((p in gt.positives for p in pairs), dtype=bool, count=n)
    return known, positive


def evaluate(predictions: Predictions, gt: GroundTruth, max_pairs: int = MAX_PAIRS) -> Metrics:
    """Score a submission against the ground truth (see the module docstring for the rules)."""
    n = len(predictions)
    if n > max_pairs:
        raise ValueError(f"submission has {n} predicted pairs, more than the limit of {max_pairs}")
    if gt.n_positives == 0:
        raise ValueError("ground truth has no positive pair: recall is undefined")
    known, positive = _label(predictions, gt)
    scores, labels = predictions.scores[known], positive[known]
    curve = precision_recall_curve(labels, scores, gt.n_positives)
    r_p90, t_p90 = recall_at_precision(curve, TARGET_PRECISION)
    n_pos_queries = len(gt.positive_queries)
    return Metrics(
        micro_ap=average_precision(curve),
        recall_at_p90=r_p90,
        threshold_at_p90=t_p90,
        recall_at_rank1=recall_at_rank1(
            predictions.query_ids[known], scores, labels, n_pos_queries
        ),
        n_predictions=n,
        n_evaluated=int(known.sum()),
        n_ignored=int(n - known.sum()),
        n_true_positives=int(labels.sum()),
        n_positives=gt.n_positives,
        n_positive_queries=n_pos_queries,
        curve=curve,
    )


# --------------------------------------------------------------------------- output


def format_metrics(m: Metrics) -> list[str]:
    """One readable line per metric."""
    p90 = f"{m.recall_at_p90:.4f}"
    if m.threshold_at_p90 is None:
        p90 += "  (precision 0.9 never reached)"
    else:
        p90 += f"  (score threshold {m.threshold_at_p90:.6g})"
    return [
        f"micro-AP        {m.micro_ap:.4f}",
        f"recall@P90      {p90}",
        f"recall@rank-1   {m.recall_at_rank1:.4f}  ({m.n_positive_queries} queries with a match)",
        f"predictions     {m.n_predictions}  ({m.n_evaluated} evaluated, {m.n_ignored} ignored: "
        "query not in ground truth)",
        f"positives       {m.n_positives}  ({m.n_true_positives} predicted)",
    ]


def plot_pr_curve(m: Metrics, path: str | os.PathLike) -> Path:
    """Write the precision-recall curve as a PNG (Agg canvas, no display), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # steps-pre: precision p_i over (r_{i-1}, r_i], so the area under the line is the micro-AP
    recalls = np.concatenate([[0.0], m.curve.recalls])
    first = m.curve.precisions[:1] if len(m.curve.precisions) else np.zeros(1)
    precisions = np.concatenate([first, m.curve.precisions])
    label = f"micro-AP {m.micro_ap:.4f} (area)"
    ax.plot(recalls, precisions, drawstyle="steps-pre", label=label)
    ax.axhline(TARGET_PRECISION, color="grey", linestyle=":", linewidth=1)
    if m.threshold_at_p90 is not None:
        label = f"recall@P90 {m.recall_at_p90:.4f}"
        ax.plot([m.recall_at_p90], [TARGET_PRECISION], "o", color="tab:red", label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ISC2021 matching track: precision-recall")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.isc_metric",
        description="ISC2021 matching-track metrics (micro-AP, recall@P90, recall@rank-1).",
    )
    p.add_argument("--predictions", required=True, help="CSV: query_id,reference_id,score")
    p.add_argument("--gt", required=True, help="CSV: query_id,reference_id (empty = distractor)")
    p.add_argument("--plot", help="write the precision-recall curve to this PNG")
    p.add_argument("--json", help="write the scalar metrics to this JSON file")
    p.add_argument("--max-pairs", type=int, default=MAX_PAIRS, help="submission size limit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return 0, or 2 with a one-line message on stderr for bad input."""
    args = _parse_args(argv)
    try:
        gt = load_ground_truth(args.gt)
        metrics = evaluate(load_predictions(args.predictions), gt, max_pairs=args.max_pairs)
        if args.json:
            write_json(args.json, metrics.to_dict())
        if args.plot:
            plot_pr_curve(metrics, args.plot)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_metrics(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
