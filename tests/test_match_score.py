"""Match scoring stage: calibrated scores, resumption after SIGKILL, merge into a submission."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from common import UserError
from common.config import REPO_ROOT, load_config
from common.shards import ShardStore
from local_fea import extract, search
from match_score import verify
from match_score.score import FEATURES, ScoreModel
from tests.conftest import DATA, kill_midway, python


def _rows(inliers, matches, agree, cells, coverage=None) -> list[dict[str, float]]:
    coverage = agree if coverage is None else coverage
    return [{"inliers": i, "matches": m, "dense_agree": a, "dense_cells": c, "coverage": v}
            for i, m, a, c, v in zip(inliers, matches, agree, cells, coverage, strict=True)]


def test_score_model_fit_predict_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 2, n)
    inliers = np.where(labels, rng.integers(8, 200, n), rng.integers(0, 15, n))
    matches = inliers + rng.integers(0, 30, n)
    agree = np.clip(np.where(labels, 0.85, 0.35) + rng.normal(0, 0.1, n), 0, 1)
    rows = _rows(inliers, matches, agree, rng.integers(20, 150, n))
    model = ScoreModel.fit(rows, labels, trained_on="synthetic")
    p = model.predict(rows)
    assert ((p > 0.5) == labels.astype(bool)).mean() > 0.95
    assert len(np.unique(p[p > 0])) > 0.9 * (p > 0).sum()  # floats, no tie blocks
    assert model.predict(_rows([0], [10], [0.9], [100]))[0] == 0.0  # no inlier, no score
    model.save(tmp_path / "m.json")
    np.testing.assert_allclose(ScoreModel.load(tmp_path / "m.json").predict(rows), p)


def test_shipped_score_model_is_monotone_in_evidence() -> None:
    model = ScoreModel.load(REPO_ROOT / load_config()["match_score"]["score_model"])
    assert model.features == list(FEATURES)
    weak, strong = model.predict(_rows([6, 60], [20, 70], [0.3, 0.95], [80, 80]))
    assert 0 < weak < 0.5 < strong < 1


def test_missing_or_stale_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="calibrate"):
        ScoreModel.load(tmp_path / "none.json")
    (tmp_path / "old.json").write_text(
        '{"features": ["inliers"], "mean": [0], "scale": [1], "coef": [1], "intercept": 0}')
    with pytest.raises(UserError, match="refit with `make calibrate"):
        ScoreModel.load(tmp_path / "old.json")


def _verify_cmd(work: Path, stores: tuple[Path, Path, Path]) -> list[str]:
    queries, refs, candidates = stores
    return [python(), "-m", "match_score.verify", "--queries", str(queries),
            "--references", str(refs), "--candidates", str(candidates), "--work", str(work),
            "-o", "match_score.chunk_pairs=4", "--n-jobs", "1"]


@pytest.mark.slow
def test_verify_sigkill_midway_then_restart_gives_identical_pairs(tmp_path: Path) -> None:
    conf = load_config()
    clean = tmp_path / "clean"
    refs = extract.main(conf, DATA / "referenceimages", clean)
    queries = extract.main(conf, DATA / "queryimages", clean, mirror=True)
    candidates = search.main(conf, queries, refs, clean)
    killed = tmp_path / "killed"
    shutil.copytree(clean, killed)  # same features and candidates, no pairs yet
    inputs = (queries, refs, candidates)
    subprocess.run(_verify_cmd(clean, inputs), check=True, capture_output=True)
    clean_pairs = next(clean.rglob("pairs.csv"))
    n_chunks = len(list(clean_pairs.parent.glob("parts/chunk_*.csv")))

    moved = tuple(killed / p.relative_to(clean) for p in inputs)
    kill_midway(_verify_cmd(killed, moved), killed, "chunk_*.csv", 3, n_chunks)
    assert not list(killed.rglob("pairs.csv"))
    subprocess.run(_verify_cmd(killed, moved), check=True, capture_output=True)
    killed_pairs = next(killed.rglob("pairs.csv"))
    assert killed_pairs.read_bytes() == clean_pairs.read_bytes()
    for chunk in sorted(clean_pairs.parent.glob("parts/*")):
        assert (killed_pairs.parent / "parts" / chunk.name).read_bytes() == chunk.read_bytes()


def test_verify_again_after_the_references_grew_in_one_process(tmp_path: Path) -> None:
    """A long-lived worker verifies again after the reference store gained images: its cached
    features must not be those of the smaller store (they raised KeyError)."""
    conf = load_config(overrides=["run.n_jobs=1", "run.shard_size=8"])
    refs_dir = tmp_path / "refs"
    refs_dir.mkdir()
    all_refs = sorted((DATA / "referenceimages").glob("*.jpg"))
    for path in all_refs[:8]:
        shutil.copy(path, refs_dir / path.name)
    queries = extract.main(conf, DATA / "queryimages", tmp_path, mirror=True)
    refs = extract.main(conf, refs_dir, tmp_path)
    query_id = ShardStore(queries).ids[0]
    first = verify.verify_pairs(conf, [(query_id, all_refs[0].stem, "orig", "")], queries, refs,
                                tmp_path / "v1")
    assert len(first) == 1
    for path in all_refs[8:16]:
        shutil.copy(path, refs_dir / path.name)
    extract.main(conf, refs_dir, tmp_path)
    again = verify.verify_pairs(conf, [(query_id, all_refs[12].stem, "orig", "")], queries, refs,
                                tmp_path / "v2")
    assert again[0]["reference_id"] == all_refs[12].stem


def test_visualize_draws_a_verified_pair(tmp_path: Path) -> None:
    from match_score import visualize

    conf = load_config()
    with open(DATA / "gt.csv") as f:
        query_id, ref_id = next((r["query_id"], r["reference_id"]) for r in csv.DictReader(f)
                                if r["reference_id"])
    refs = extract.main(conf, DATA / "referenceimages", tmp_path)
    queries = extract.main(conf, DATA / "queryimages", tmp_path, mirror=True)
    out = visualize.main(conf, query_id, ref_id, queries, refs, tmp_path)
    picture = cv2.imread(str(out))
    assert picture.shape[0] == visualize.HEIGHT + 60
    green = (picture[:visualize.HEIGHT] == visualize.COLOURS[1]).all(-1).sum()
    assert green > 500  # inlier lines were drawn
    with pytest.raises(UserError, match="not in"):
        visualize.main(conf, "nope", ref_id, queries, refs, tmp_path)


def test_calibration_verifies_without_a_score_model(tmp_path: Path) -> None:
    """Fitting a new score model must not need one (the missing model's error named the very
    command that was failing)."""
    from calibration import score as calibrate

    conf = load_config(overrides=[f"match_score.score_model={tmp_path / 'none.json'}"])
    rows = calibrate.run_local_branch(conf, DATA, tmp_path / "work")
    assert rows and "score" not in rows[0]
    keys = [(r["query_id"], r["reference_id"], r["view"]) for r in rows]
    assert keys == sorted(keys) and any(int(r["inliers"]) > 0 for r in rows)


def test_pairs_verified_by_an_older_version_are_a_user_error() -> None:
    model = ScoreModel.load(REPO_ROOT / load_config()["match_score"]["score_model"])
    old = [{"inliers": 9, "matches": 12, "dense_agree": 0.8, "dense_cells": 40}]
    with pytest.raises(UserError, match="verify them again"):
        model.predict(old)
