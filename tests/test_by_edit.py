"""Metrics on queries of chosen edit kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation import by_edit


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_edit_kinds_and_subset_metrics(tmp_path: Path, capsys) -> None:
    assert by_edit.edit_kinds("onto_bg0.44+jpeg30+rot-7") == {"onto_bg", "jpeg", "rot"}
    gt = _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\nq2,r2\nq3,\n")
    edits = _write(tmp_path / "edits.csv", "query_id,edits\nq1,onto_bg0.5+blur2\nq2,pad\n"
                   "q3,onto_bg0.3\n")
    preds = _write(tmp_path / "p.csv", "query_id,reference_id,score\nq1,r1,0.9\nq3,r9,0.8\n"
                   "q2,r7,0.7\n")
    args = ["--predictions", preds, "--gt", gt, "--edits", edits]
    assert by_edit.main([*args, "--kinds", "onto_bg,pad"]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert lines["onto_bg"][:3] == ["2", "1", "1.0000"]  # q1 right, the distractor q3 after it
    assert lines["pad"][:3] == ["1", "1", "0.0000"]  # q2's only prediction is wrong
    with pytest.raises(SystemExit):
        by_edit.main([*args, "--kinds", "rotate"])
    assert "rotate" in capsys.readouterr().err


def test_false_pairs_above_a_score_per_100_queries(tmp_path: Path, capsys) -> None:
    """Look-alike queries have no copy: the column counts their pairs above the score."""
    gt = _write(tmp_path / "gt.csv", "query_id,reference_id\nq1,r1\nq2,\nq3,\nq4,\n")
    edits = _write(tmp_path / "edits.csv", "query_id,edits\nq1,crop0.5\nq2,lookalike_made\n"
                   "q3,lookalike_made+jpeg9\nq4,lookalike_real\n")
    preds = _write(tmp_path / "p.csv", "query_id,reference_id,score\nq1,r1,0.95\nq1,r2,0.9\n"
                   "q2,r1,0.92\nq3,r3,0.5\nq4,r4,0.99\n")
    assert by_edit.main(["--predictions", preds, "--gt", gt, "--edits", edits, "--kinds",
                         "lookalike_made,lookalike_real", "--above", "0.9"]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert lines["lookalike_made"] == ["2", "0", "-", "-", "-", "50.00"]  # q2 above, q3 not
    assert lines["lookalike_real"][-1] == "100.00"
    assert lines["all"][-1] == "75.00"  # q1->r2, q2->r1, q4->r4 over 4 queries
