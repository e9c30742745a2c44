"""Tests of the ISC2021 matching-track metric; every expected value is worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.isc_metric import (
    GroundTruth,
    Metrics,
    Predictions,
    evaluate,
    load_ground_truth,
    load_predictions,
    plot_pr_curve,
)

REPO = Path(__file__).resolve().parents[1]


def _metrics(gt_pairs: list[tuple[str, str | None]], rows: list[tuple[str, str, float]], **kw):
    return evaluate(Predictions.from_rows(rows), GroundTruth.from_pairs(gt_pairs), **kw)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- micro-AP


def test_perfect_ranking_has_ap_one() -> None:
    # Ranking: TP(.9) TP(.8) FP(.1, distractor query d1).
    # precision 1, 1, 2/3; recall 1/2, 1, 1.
    # AP = 1/2*1 + 1/2*1 + 0*(2/3) = 1.  The trailing FP adds no recall, so it costs nothing.
    gt = [("q1", "r1"), ("q2", "r2"), ("d1", None)]
    m = _metrics(gt, [("q1", "r1", 0.9), ("q2", "r2", 0.8), ("d1", "r5", 0.1)])
    assert m.micro_ap == pytest.approx(1.0)
    assert m.recall_at_p90 == pytest.approx(1.0)
    assert m.recall_at_rank1 == pytest.approx(1.0)
    assert (m.n_predictions, m.n_evaluated, m.n_ignored) == (3, 3, 0)
    assert (m.n_true_positives, m.n_positives, m.n_positive_queries) == (2, 2, 2)


def test_interleaved_false_positive() -> None:
    # 3 positives. Ranking: TP(.9) FP(.8) TP(.7) TP(.6).
    # precision at the TPs: 1/1, 2/3, 3/4  ->  AP = (1 + 2/3 + 3/4) / 3 = 29/36 = 0.80556.
    # recall@P90: precisions 1, 1/2, 2/3, 3/4 -> only rank 1 is >= 0.9 -> recall 1/3, thr 0.9.
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3")]
    rows = [("q3", "r3", 0.6), ("q1", "r9", 0.8), ("q2", "r2", 0.7), ("q1", "r1", 0.9)]
    m = _metrics(gt, rows)
    assert m.micro_ap == pytest.approx(29 / 36)
    assert m.recall_at_p90 == pytest.approx(1 / 3)
    assert m.threshold_at_p90 == pytest.approx(0.9)
    # Each query's top prediction is its positive (q1: r1 .9 beats r9 .8).
    assert m.recall_at_rank1 == pytest.approx(1.0)
    # The PR curve, in ranking order.
    np.testing.assert_allclose(m.curve.precisions, [1, 1 / 2, 2 / 3, 3 / 4])
    np.testing.assert_allclose(m.curve.recalls, [1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(m.curve.thresholds, [0.9, 0.8, 0.7, 0.6])


def test_ties_are_broken_pessimistically() -> None:
    # 2 positives. q1/r1 (TP) and q2/r7 (FP) share the score 0.5; q2/r2 (TP) has 0.4.
    # Pessimistic order (FP first among equal scores): FP, TP, TP
    #   precision at the TPs 1/2, 2/3  ->  AP = (1/2 + 2/3) / 2 = 7/12 = 0.58333.
    # Optimistic order would be TP, FP, TP
    #   precision at the TPs 1/1, 2/3  ->  AP = (1 + 2/3) / 2 = 5/6 = 0.83333.
    gt = [("q1", "r1"), ("q2", "r2")]
    rows = [("q1", "r1", 0.5), ("q2", "r7", 0.5), ("q2", "r2", 0.4)]
    m = _metrics(gt, rows)
    assert m.micro_ap == pytest.approx(7 / 12)
    assert m.micro_ap != pytest.approx(5 / 6)
    # The file order does not matter: the TP listed last gives the same answer.
    assert _metrics(gt, rows[::-1]).micro_ap == pytest.approx(7 / 12)


def test_constant_score_cannot_game_ap() -> None:
    # 2 TP + 2 FP all scored 1.0 -> ranked FP, FP, TP, TP.
    # precision at the TPs 1/3, 2/4  ->  AP = (1/3 + 1/2) / 2 = 5/12.
    gt = [("q1", "r1"), ("q2", "r2")]
    rows = [("q1", "r1", 1.0), ("q2", "r2", 1.0), ("q1", "r8", 1.0), ("q2", "r9", 1.0)]
    m = _metrics(gt, rows)
    assert m.micro_ap == pytest.approx(5 / 12)
    assert m.recall_at_rank1 == 0.0  # both queries' top-1 is a tied FP


def test_positives_never_predicted_lower_ap() -> None:
    # 4 positives, only 2 predicted, both ranked first: precision 1, 1.
    # AP = (1 + 1 + 0 + 0) / 4 = 1/2: the denominator counts all ground-truth positives.
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3"), ("q4", "r4")]
    m = _metrics(gt, [("q1", "r1", 0.9), ("q2", "r2", 0.8)])
    assert m.micro_ap == pytest.approx(0.5)
    assert m.recall_at_p90 == pytest.approx(0.5)
    assert m.recall_at_rank1 == pytest.approx(0.5)  # q3, q4 have no prediction
    assert (m.n_positives, m.n_true_positives) == (4, 2)


def test_distractor_predictions_are_false_positives() -> None:
    # d1 is a distractor query in the ground truth: its prediction (.9) is a FP ranked first.
    # Ranking FP, TP, TP -> AP = (1/2 + 2/3) / 2 = 7/12.
    gt = [("q1", "r1"), ("q2", "r2"), ("d1", None)]
    rows = [("d1", "r1", 0.9), ("q1", "r1", 0.8), ("q2", "r2", 0.7)]
    m = _metrics(gt, rows)
    assert m.micro_ap == pytest.approx(7 / 12)
    assert (m.n_evaluated, m.n_ignored) == (3, 0)


def test_predictions_for_unknown_queries_are_ignored() -> None:
    # Same as above but the first query, x9, is not in the ground truth at all: it is dropped,
    # leaving TP, TP -> AP = 1.
    gt = [("q1", "r1"), ("q2", "r2"), ("d1", None)]
    rows = [("x9", "r1", 0.9), ("q1", "r1", 0.8), ("q2", "r2", 0.7)]
    m = _metrics(gt, rows)
    assert m.micro_ap == pytest.approx(1.0)
    assert (m.n_predictions, m.n_evaluated, m.n_ignored) == (3, 2, 1)
    assert len(m.curve.precisions) == 2


def test_query_with_several_positives() -> None:
    # q1 matches r1 and r2 (2 positive pairs); ranking TP, TP, FP -> AP = (1 + 1) / 2 = 1.
    gt = [("q1", "r1"), ("q1", "r2"), ("q2", None)]
    m = _metrics(gt, [("q1", "r1", 0.9), ("q1", "r2", 0.8), ("q2", "r3", 0.7)])
    assert m.micro_ap == pytest.approx(1.0)
    assert (m.n_positives, m.n_positive_queries) == (2, 1)
    assert m.recall_at_rank1 == pytest.approx(1.0)  # one query, top-1 is one of its positives


# --------------------------------------------------------------------------- recall@P90


def test_recall_at_p90_reached_exactly_at_precision_point_nine() -> None:
    # 12 positives q0..q11 -> r0..r11; d0 is a distractor.
    # rank  1: FP (d0)            precision 0/1
    # ranks 2..10: TP q0..q8      precision (k-1)/k < 0.9 up to rank 9 (8/9 = 0.889),
    #                             rank 10: 9/10 = 0.9 exactly (counts: precision >= 0.9)
    # rank 11: FP (d0)            9/11 = 0.818
    # rank 12: TP q9              10/12 = 0.833
    # q10, q11 never predicted.
    # -> recall@P90 = 9/12 = 0.75, at the score of rank 10.
    gt = [(f"q{i}", f"r{i}") for i in range(12)] + [("d0", None)]
    rows = [("d0", "x1", 1.0)]
    rows += [(f"q{i}", f"r{i}", 0.9 - 0.01 * i) for i in range(9)]  # ranks 2..10: .90 .. .82
    rows += [("d0", "x2", 0.5), ("q9", "r9", 0.4)]
    m = _metrics(gt, rows)
    assert m.recall_at_p90 == pytest.approx(0.75)
    assert m.threshold_at_p90 == pytest.approx(0.82)
    assert m.curve.precisions[9] == pytest.approx(0.9)


def test_recall_at_p90_never_reached() -> None:
    # Ranking FP, TP: precision 0, 1/2 -> never >= 0.9 -> recall@P90 = 0, no threshold.
    gt = [("q1", "r1"), ("q2", "r2")]
    m = _metrics(gt, [("q1", "r9", 0.9), ("q2", "r2", 0.8)])
    assert m.recall_at_p90 == 0.0
    assert m.threshold_at_p90 is None


# --------------------------------------------------------------------------- recall@rank-1


def test_recall_at_rank1() -> None:
    # Queries with positives: q1, q2, q3 (two positives), q4, q6 -> denominator 5.
    # q1: r8 (.95, FP) beats r1 (.9)                   -> miss
    # q2: r9 (.7, FP) ties r2 (.7): FP first           -> miss
    # q3: r3a and r3b tie at .6, both positives        -> hit (the query counts once)
    # q4: no prediction                                -> miss
    # q6: single prediction r6, positive               -> hit
    # d1 (distractor) and x5 (unknown) are not in the denominator.
    # recall@rank-1 = 2/5 = 0.4
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3a"), ("q3", "r3b"), ("q4", "r4"), ("q6", "r6")]
    gt += [("d1", None)]
    rows = [
        ("q1", "r1", 0.9),
        ("q1", "r8", 0.95),
        ("q2", "r2", 0.7),
        ("q2", "r9", 0.7),
        ("q3", "r3a", 0.6),
        ("q3", "r3b", 0.6),
        ("q3", "x", 0.4),
        ("q6", "r6", 0.3),
        ("d1", "r1", 0.99),
        ("x5", "r5", 0.99),
    ]
    m = _metrics(gt, rows)
    assert m.n_positive_queries == 5
    assert m.recall_at_rank1 == pytest.approx(0.4)


# --------------------------------------------------------------------------- input checks


def test_load_files(tmp_path: Path) -> None:
    gt = load_ground_truth(
        _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\nq1,r2\nq2,\n")
    )
    assert gt.queries == {"q1", "q2"}
    assert gt.positives == {("q1", "r1"), ("q1", "r2")}
    preds = load_predictions(
        _write(tmp_path / "p.csv", "query_id,reference_id,score\nq1,r1,0.5\nq2,r3,-1e-3\n")
    )
    assert preds.query_ids.tolist() == ["q1", "q2"]
    assert preds.reference_ids.tolist() == ["r1", "r3"]
    np.testing.assert_allclose(preds.scores, [0.5, -0.001])


def test_duplicate_pair_is_rejected(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.csv", "query_id,reference_id,score\nq1,r1,0.5\nq1,r2,0.6\nq1,r1,0.7\n"
    )
    with pytest.raises(ValueError, match=r"duplicate pair \(q1, r1\).*line 2") as e:
        load_predictions(path)
    assert "line 4" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"duplicate pair \(q1, r1\)"):
        Predictions.from_rows([("q1", "r1", 0.5), ("q1", "r1", 0.5)])
    with pytest.raises(ValueError, match=r"duplicate pair \(q1, r1\)"):
        Predictions(np.array(["q1", "q1"]), np.array(["r1", "r1"]), np.array([0.1, 0.2]))


@pytest.mark.parametrize(
    "header", ["query_id,reference_id", "query,reference,score", "score,query_id,reference_id"]
)
def test_wrong_prediction_header(tmp_path: Path, header: str) -> None:
    path = _write(tmp_path / "p.csv", f"{header}\nq1,r1,0.5\n")
    with pytest.raises(ValueError, match="header must be 'query_id,reference_id,score'"):
        load_predictions(path)


def test_wrong_ground_truth_header_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="header must be 'query_id,reference_id'"):
        load_ground_truth(_write(tmp_path / "gt.csv", "q,r\nq1,r1\n"))
    with pytest.raises(ValueError, match="empty file"):
        load_ground_truth(_write(tmp_path / "empty.csv", ""))


@pytest.mark.parametrize("score", ["abc", "", "nan", "NaN", "inf"])
def test_bad_score_is_rejected(tmp_path: Path, score: str) -> None:
    path = _write(tmp_path / "p.csv", f"query_id,reference_id,score\nq1,r1,0.5\nq2,r2,{score}\n")
    with pytest.raises(ValueError, match="line 3: score"):
        load_predictions(path)


def test_wrong_column_count_and_conflicting_ground_truth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line 2: expected 3 columns, got 2"):
        load_predictions(_write(tmp_path / "p.csv", "query_id,reference_id,score\nq1,r1\n"))
    with pytest.raises(ValueError, match="both a distractor"):
        load_ground_truth(_write(tmp_path / "gt.csv", "query_id,reference_id\nq1,\nq1,r1\n"))
    with pytest.raises(ValueError, match=r"duplicate pair \(q1, r1\)"):
        load_ground_truth(_write(tmp_path / "gt2.csv", "query_id,reference_id\nq1,r1\nq1,r1\n"))


def test_submission_size_cap() -> None:
    # 4 pairs with max_pairs=3 is refused; the first 3 are accepted: the positive q1/r0 is
    # ranked first (score 1.0) -> AP = 1.
    gt = [("q1", "r0")]
    rows = [("q1", f"r{i}", 1.0 - 0.1 * i) for i in range(4)]
    with pytest.raises(ValueError, match="4 predicted pairs, more than the limit of 3"):
        _metrics(gt, rows, max_pairs=3)
    assert _metrics(gt, rows[:3], max_pairs=3).micro_ap == pytest.approx(1.0)


def test_ground_truth_without_positive_is_rejected() -> None:
    with pytest.raises(ValueError, match="no positive"):
        _metrics([("q1", None)], [("q1", "r1", 1.0)])


def test_no_evaluated_prediction_gives_zero(tmp_path: Path) -> None:
    m = _metrics([("q1", "r1")], [("x1", "r1", 1.0)])
    assert (m.micro_ap, m.recall_at_p90, m.recall_at_rank1, m.n_ignored) == (0.0, 0.0, 0.0, 1)
    plot_pr_curve(m, tmp_path / "empty.png")  # an empty curve still plots
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_many_pairs_are_fast() -> None:
    # 500k pairs, one positive per 10 queries, all scores distinct; only checks it runs and
    # stays consistent (AP between 0 and 1, curve as long as the input).
    rng = np.random.default_rng(0)
    n = 500_000
    q = np.char.add("q", (np.arange(n) // 10).astype(str))
    r = np.char.add("r", np.arange(n).astype(str))
    gt = GroundTruth.from_pairs((f"q{i}", f"r{10 * i}") for i in range(n // 10))
    m = evaluate(Predictions(q, r, rng.random(n)), gt)
    assert isinstance(m, Metrics)
    assert 0.0 < m.micro_ap < 1.0
    assert len(m.curve.recalls) == n and m.curve.recalls[-1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- CLI


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "evaluation.isc_metric", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path: Path) -> None:
    # The interleaved case: AP 29/36 = 0.8056, recall@P90 1/3, recall@rank-1 1; plus one
    # prediction for an unknown query, ignored.
    gt = _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\nq2,r2\nq3,r3\nd1,\n")
    sub = _write(
        tmp_path / "sub.csv",
        "query_id,reference_id,score\nq1,r1,0.9\nq1,r9,0.8\nq2,r2,0.7\nq3,r3,0.6\nzz,r1,0.95\n",
    )
    png, js = tmp_path / "out" / "pr.png", tmp_path / "out" / "metrics.json"
    res = _cli("--predictions", sub, "--gt", gt, "--plot", png, "--json", js)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["micro-AP", "0.8056"] for line in lines)
    assert any(line.split()[:2] == ["recall@P90", "0.3333"] for line in lines)
    assert any(line.split()[:2] == ["recall@rank-1", "1.0000"] for line in lines)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["micro_ap"] == pytest.approx(29 / 36)
    assert (data["n_predictions"], data["n_ignored"], data["n_positives"]) == (5, 1, 3)
    assert sorted(p.name for p in png.parent.iterdir()) == ["metrics.json", "pr.png"]


def test_cli_help() -> None:
    res = _cli("--help")
    assert res.returncode == 0
    assert "--predictions" in res.stdout and "--plot" in res.stdout


@pytest.mark.parametrize(
    ("sub_text", "message"),
    [
        ("query_id,ref,score\nq1,r1,0.5\n", "header must be"),
        ("query_id,reference_id,score\nq1,r1,oops\n", "line 2: score 'oops' is not a number"),
        ("query_id,reference_id,score\nq1,r1,1\nq1,r1,2\n", "duplicate pair (q1, r1)"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, sub_text: str, message: str) -> None:
    gt = _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\n")
    sub = _write(tmp_path / "sub.csv", sub_text)
    res = _cli("--predictions", sub, "--gt", gt, "--json", tmp_path / "m.json")
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "m.json").exists()


def test_cli_missing_file_and_cap(tmp_path: Path) -> None:
    gt = _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\n")
    res = _cli("--predictions", tmp_path / "nope.csv", "--gt", gt)
    assert res.returncode == 2 and "nope.csv" in res.stderr and "Traceback" not in res.stderr
    sub = _write(tmp_path / "sub.csv", "query_id,reference_id,score\nq1,r1,1\nq1,r2,2\n")
    res = _cli("--predictions", sub, "--gt", gt, "--max-pairs", "1")
    assert res.returncode == 2 and "2 predicted pairs" in res.stderr
