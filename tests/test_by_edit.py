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
