"""Fusion: one candidate set, evidence filled in, the calibrated model, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest

from common import UserError
from common.config import load_config
from merge import branches, evidence, fuse
from merge.branches import BranchEvidence
from merge.evidence import LOGIT_FLOOR, Evidence
from merge.features import gather, top_ranked
from merge.fusion import FusionModel
from tests.conftest import python


def _fake(name: str, found: dict, features: tuple[str, ...], fill_all: bool, calls: list,
          scale: str = branches.PROBABILITY) -> BranchEvidence:
    def read(conf, path):
        return Evidence({p: np.array(v) for p, (v, _) in found.items()},
                        {p: s for p, (_, s) in found.items()})

    def fill(conf, pairs_file, pairs, folder, branch_name):
        calls.append((branch_name, sorted(pairs)))
        return Evidence({p: np.full(len(features), 0.5) for p in pairs})

    return BranchEvidence(name, features, tuple(-1.0 for _ in features), scale, read, fill,
                          fill_all)


def test_gather_unions_pairs_and_fills_missing_evidence(tmp_path: Path) -> None:
    conf = load_config(overrides=["merge.fill_rank=1"])
    calls: list = []
    costly = _fake("costly", {("q1", "r1"): ([3.0], 0.9), ("q2", "r1"): ([2.0], 0.8)},
                   ("c",), fill_all=False, calls=calls)
    cheap = _fake("cheap", {("q1", "r2"): ([0.7, 0.2], 0.2), ("q1", "r3"): ([0.6, 0.1], 0.1),
                            ("q2", "r1"): ([0.9, 0.4], 0.4)}, ("s", "n"), fill_all=True,
                  calls=calls)
    files = {"costly": tmp_path, "cheap": tmp_path}
    table = gather(conf, [costly, cheap], files, tmp_path)
    assert table.pairs == [("q1", "r1"), ("q1", "r2"), ("q1", "r3"), ("q2", "r1")]
    assert table.features == ["c", "s", "n"]
    assert table.found_by == ["costly", "cheap", "cheap", "costly+cheap"]
    # the costly branch verifies only what another branch ranks first for its query (q1/r2),
    # the cheap one fills every pair it lacks
    assert calls == [("costly", [("q1", "r2")]), ("cheap", [("q1", "r1")])]
    assert table.x.tolist() == [[3.0, 0.5, 0.5], [0.5, 0.7, 0.2], [-1.0, 0.6, 0.1],
                                [2.0, 0.9, 0.4]]
    # a branch with the gap: its first feature less the best of the query's pairs, after fills
    gapped = gather(conf, [dataclasses.replace(costly, gap=True), cheap], files, tmp_path)
    assert gapped.features == ["c", "c_gap", "s", "n"]
    assert gapped.x[:, 1].tolist() == [0.0, -2.5, -4.0, 0.0]


def test_top_ranked_is_per_query() -> None:
    ev = Evidence(scores={("a", "1"): 0.1, ("a", "2"): 0.9, ("b", "1"): 0.05})
    assert top_ranked(ev, 1) == {("a", "2"), ("b", "1")}
    assert top_ranked(ev, 0) == set()


def test_local_evidence_keeps_the_best_view_and_floors_no_inliers() -> None:
    conf = load_config()

    def row(q, r, view, inliers, matches):
        return {"query_id": q, "reference_id": r, "view": view, "matches": matches,
                "inliers": inliers, "inliers_h1": inliers, "inliers_h2": 0,
                "dense_agree": 0.6, "dense_cells": 40, "coverage": 0.6,
                "pair_logit": 2.0 - inliers / 10}

    ev = evidence.local_evidence([row("q", "r", "orig", 4, 40), row("q", "r", "mirror", 40, 60),
                                  row("q", "s", "orig", 0, 3)], conf)
    strong = evidence.local_evidence([row("q", "r", "mirror", 40, 60)], conf)
    weak = evidence.local_evidence([row("q", "r", "orig", 4, 40)], conf)
    assert ev.features[("q", "r")][0] == pytest.approx(strong.features[("q", "r")][0])
    assert strong.features[("q", "r")][0] > weak.features[("q", "r")][0] > LOGIT_FLOOR
    assert ev.features[("q", "s")][0] == LOGIT_FLOOR and ev.scores[("q", "s")] == 0.0
    with_pair = evidence.local_evidence([row("q", "r", "orig", 4, 40),
                                         row("q", "r", "mirror", 40, 60)], conf, with_pair=True)
    assert with_pair.features[("q", "r")].tolist() == [ev.features[("q", "r")][0], -2.0]
    weak = evidence.local_evidence([row("q", "r", "orig", 4, 40)], conf, with_pair=True)
    assert weak.features[("q", "r")][1] == 0.0  # the verifier's "copy" adds nothing


def test_fusion_model_is_calibrated_deterministic_and_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    x = np.c_[rng.normal(labels * 2.0, 1.0), rng.normal(0, 1, 400)]
    from merge.features import PairTable

    table = PairTable([(f"q{i}", "r") for i in range(400)], ["useful", "noise"], x, [])
    model = FusionModel.fit(table, labels.astype(int))
    assert model.coef[0] > 5 * abs(model.coef[1])
    path = model.save(tmp_path / "fusion.json")
    again = FusionModel.load(path, ["useful", "noise"])
    scores = again.score(table)
    assert np.array_equal(scores, model.score(table)) and len(np.unique(scores)) == 400
    grid = np.c_[np.linspace(-3, 3, 50), np.zeros(50)]  # more evidence, higher score
    assert np.all(np.diff(again.probability(grid)) > 0)
    with pytest.raises(UserError, match="calibrate-fusion"):
        FusionModel.load(path, ["useful", "noise", "crop_local_logit"])


def test_local_gap_tells_a_copy_from_its_look_alikes_among_a_query_s_pairs() -> None:
    """The fusion's ``local_logit_gap``: 0 for a query's best pair, below 0 for the others."""
    from merge.features import feature_names, query_gaps

    pairs = [("q1", "r1"), ("q1", "r2"), ("q2", "r1"), ("q2", "r3")]
    gaps = query_gaps(pairs, np.array([6.0, 1.0, -12.0, -3.0]))
    np.testing.assert_array_equal(gaps, [0.0, -5.0, -9.0, 0.0])
    names = feature_names(branches.selected(["local", "global", "crop_global"]))
    assert names == ["local_logit", "pair_veto", "local_logit_gap", "global_sim",
                     "global_norm", "crop_global_sim", "crop_global_norm"]


def _pairs_file(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_fuse_max_method_from_given_pair_files(tmp_path: Path) -> None:
    from global_fea.search import COLUMNS

    glob = _pairs_file(tmp_path / "g.csv", COLUMNS, [
        ["q1", "r1", "orig", 0.9, 0.4, 0, 0.4], ["q1", "r2", "orig", 0.5, 0.1, 1, 0.1]])
    out = tmp_path / "sub.csv"
    cmd = [python(), "-m", "merge.fuse", "--pairs", f"global={glob}", "--out", str(out),
           "--work", str(tmp_path / "work"), "-o", "merge.branches=[global]",
           "-o", "merge.method=max"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows == [["query_id", "reference_id", "score"], ["q1", "r1", "0.4"],
                    ["q1", "r2", "0.1"]]
    bad = subprocess.run([*cmd[:4], "global", *cmd[5:]], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --pairs 'global' is not of the form NAME=FILE (e.g. global=...)"]
    with pytest.raises(UserError, match="unknown branch"):
        branches.selected(["global", "nonesuch"])


def test_max_method_refuses_scores_of_different_scales(tmp_path: Path) -> None:
    """A local probability and a normalised cosine are not comparable: max over both is an
    error (it used to rank one branch's scores above the other's by their scale alone)."""
    conf = load_config(overrides=["merge.method=max"])
    calls: list = []
    local = _fake("local", {("q1", "r1"): ([3.0], 0.9)}, ("l",), False, calls)
    glob = _fake("global", {("q1", "r2"): ([0.7, 0.2], 0.2)}, ("s", "n"), True, calls,
                 scale=branches.SIMILARITY)
    files = {"local": tmp_path, "global": tmp_path, "crop_local": tmp_path}
    with pytest.raises(UserError, match="different scales"):
        fuse.main(conf, [local, glob], files, tmp_path / "work")
    crop = _fake("crop_local", {("q1", "r3"): ([1.0], 0.95)}, ("c",), False, calls)
    out = fuse.main(conf, [local, crop], files, tmp_path / "work", tmp_path / "sub.csv")
    assert out.read_text().splitlines() == ["query_id,reference_id,score", "q1,r3,0.95",
                                            "q1,r1,0.9"]
    assert branches.BRANCHES["local"].scale == branches.BRANCHES["crop_local"].scale
    assert branches.BRANCHES["global"].scale != branches.BRANCHES["local"].scale


def test_submission_is_best_first_tie_broken_by_ids_and_capped() -> None:
    scores = {("q1", "r1"): 0.7, ("q2", "r2"): 0.9, ("q2", "r9"): 0.5, ("q0", "r5"): 0.7}
    assert fuse.submission_rows(scores, 3) == [("q2", "r2", "0.9"), ("q0", "r5", "0.7"),
                                               ("q1", "r1", "0.7")]
    assert len(fuse.submission_rows(scores, 500_000)) == 4
