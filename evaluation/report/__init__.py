"""One HTML page per run, for a person to read: the run, the metrics, the pairs to look at.

    copydet report --work work [--gt data/gt.csv] [--edits data/edits.csv]
    python -m evaluation.report --work work [--gt data/gt.csv] [--edits data/edits.csv]

Reads the run record ``<work>/pipeline.json`` (written by ``pipeline.run``) and writes
``<work>/report/index.html`` with its pictures beside it: the image sets and their counts,
the settings of each stage, time and throughput per stage, the inputs skipped and why; with
ground truth the precision-recall curve (P90 point), score histograms of copies and
non-copies, micro-AP / recall@P90 / recall@rank-1 of every branch alone and fused, and a table
per edit kind (``--edits``); and a fixed number of pairs to look at (the highest-scoring
non-copies and the missed or lowest-scoring copies; without ground truth the top pairs and a
sample around the score ``THRESHOLD``), drawn with their verified matches and every branch's
evidence. A search box filters everything by query id. The page is self-contained (no CDN,
no web font, opens from ``file://``) and bounded: ``N_PAIRS`` pictures per list and at most
``MAX_TABLE_ROWS`` predictions in its table, however large the run. The folder is built
under a temporary name and renamed into place, so a killed run never leaves a page that
looks complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import UserError, cli
from evaluation.isc_metric import Predictions, evaluate, load_ground_truth, load_predictions
from evaluation.report.metrics import (
    as_predictions,
    branch_scores,
    edit_table,
    labels_of,
    metric_row,
)
from evaluation.report.page import building, render
from evaluation.report.pairs import (
    MAX_TABLE_ROWS,
    N_PAIRS,
    PER_QUERY,
    THRESHOLD,
    PairItem,
    draw_pairs,
    pick_pairs,
    query_ranks,
    read_features,
    table_rows,
)
from evaluation.report.plots import plot_histogram, plot_pr
from evaluation.report.record import (
    count_rows,
    crop_counts,
    image_sets,
    load_record,
    local_time,
    settings,
    skipped_inputs,
    stage_rows,
)


def _read_predictions(path: Path) -> Predictions:
    try:
        return load_predictions(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the submission: {e}") from None


def main(work: Path, gt: Path | None = None, edits: Path | None = None,
         out: Path | None = None) -> Path:
    """Write the report of the run in ``work`` (package docstring); return its index.html."""
    work = Path(work).resolve()
    out = Path(out).resolve() if out else work / "report"
    if edits is not None and gt is None:
        raise UserError("--edits needs --gt (the table per edit kind is made of metrics)")
    record = load_record(work)
    pred = _read_predictions(Path(record["submission"]))
    truth = None
    if gt is not None:
        try:
            truth = load_ground_truth(gt)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the ground truth: {e}") from None
    ranks = query_ranks(pred)
    labels = labels_of(pred, truth) if truth is not None else None
    own = branch_scores(record)
    with building(out) as folder:
        metrics, curves, edit_rows = [], [], []
        threshold = THRESHOLD
        if truth is not None:
            try:
                fused = evaluate(pred, truth)
                curves = [("fused", fused)] + [(n, evaluate(as_predictions(s), truth))
                                               for n, s in own.items()]
            except ValueError as e:
                raise UserError(str(e)) from None
            metrics = [metric_row(n, m) for n, m in curves]
            threshold = fused.threshold_at_p90
            plot_pr(curves, folder / "pr_curve.png")
            if edits is not None:
                edit_rows = edit_table(pred, truth, Path(edits))
        known = labels >= 0 if labels is not None else np.ones(len(pred), bool)
        histogram = bool(known.any())
        if histogram:
            plot_histogram(pred.scores[known], None if labels is None else labels[known],
                           threshold, folder / "scores.png")
        items = pick_pairs(pred, ranks, labels, truth)
        table = table_rows(pred, ranks, labels)
        table_pairs = {(str(pred.query_ids[i]), str(pred.reference_ids[i])) for i in table}
        feature_path = Path(record["features"]) if record.get("features") else None
        columns, feature_rows, found_by = read_features(
            feature_path, {(it.query_id, it.reference_id) for it in items}, table_pairs)
        for it in items:
            pair = (it.query_id, it.reference_id)
            row = feature_rows.get(pair)
            it.evidence = ([(c, row.get(c) or "—") for c in columns if c != "score"] if row
                           else [("features", "not a candidate pair")])
            it.evidence += [(f"{n} own score", f"{s[pair]:.4g}" if pair in s else "not found")
                            for n, s in own.items()]
        draw_pairs(items, record, folder)
        groups: dict[str, list[PairItem]] = {}
        for it in items:
            groups.setdefault(it.group, []).append(it)
        pred_rows = [[str(pred.query_ids[i]), str(pred.reference_ids[i]),
                      round(float(pred.scores[i]), 6), int(ranks[i]),
                      None if labels is None or labels[i] < 0 else int(labels[i]),
                      found_by.get((str(pred.query_ids[i]), str(pred.reference_ids[i])), "")]
                     for i in table]
        started, finished = local_time(record.get("started")), local_time(
            record.get("finished"))
        context = {
            "work": str(work), "record": record, "sets": image_sets(record),
            "crops": crop_counts(record),
            "stages": stage_rows(record, work), "settings": settings(record),
            "skipped": skipped_inputs(record, work, out),
            "started": record.get("started"), "finished": record.get("finished"),
            "duration": (finished - started).total_seconds() if started and finished else None,
            "n_predictions": len(pred), "n_queries_predicted": len(set(pred.query_ids.tolist())),
            "n_candidates": count_rows(feature_path) if feature_path and feature_path.is_file()
            else None,
            "gt": str(gt) if gt else None, "edits": str(edits) if edits else None,
            "truth": truth and {"queries": len(truth.queries), "copies": truth.n_positives,
                                "distractors": len(truth.queries - truth.positive_queries)},
            "metrics": metrics, "edit_rows": edit_rows, "histogram": histogram,
            "threshold": threshold, "groups": groups, "n_pairs": N_PAIRS,
            "pred_rows": pred_rows, "n_table": len(table), "max_table": MAX_TABLE_ROWS,
            "per_query": PER_QUERY, "default_threshold": THRESHOLD,
        }
        (folder / "index.html").write_text(render(context), encoding="utf-8")
    return out / "index.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", type=Path, help="ground truth CSV: query_id,reference_id")
    parser.add_argument("--edits", type=Path,
                        help="edits CSV (query_id,edits): a table per kind")
    parser.add_argument("--out", type=Path, help="report folder (default: <work>/report)")


COMMAND = cli.Command("report", __doc__, add_arguments,
                      lambda conf, a: main(a.work, a.gt, a.edits, a.out))
