"""The whole pipeline on the demo data, offline: local + global branches and their fusion."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DATA, offline_env, python

QUERIES, REFERENCES = DATA / "queryimages", DATA / "referenceimages"


def _run(*args: str) -> str:
    done = subprocess.run([python(), "-m", *args], check=True, capture_output=True, text=True,
                          env=offline_env())
    return done.stdout.strip().splitlines()[-1]


def _metrics(submission: Path, out: Path) -> dict:
    _run("evaluation.isc_metric", "--predictions", str(submission), "--gt",
         str(DATA / "gt.csv"), "--json", str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_demo_offline_fuses_local_and_global(tmp_path: Path) -> None:
    work = tmp_path / "work"
    common = ["--work", str(work), "--n-jobs", "2"]
    sets = ["--queries", str(QUERIES), "--references", str(REFERENCES)]
    _run("local_fea.extract", "--images", str(REFERENCES), *common)
    _run("local_fea.extract", "--images", str(QUERIES), "--mirror", *common)
    _run("local_fea.search", *sets, *common)
    _run("match_score.verify", *sets, *common)
    h5 = Path(_run("global_fea.extract", *sets, *common))
    assert h5.name == "descriptors.h5"
    global_pairs = Path(_run("global_fea.search", *sets, *common))
    with open(global_pairs) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 * 10 and {r["view"] for r in rows} == {"orig", "mirror"}

    fused = Path(_run("merge.fuse", *sets, *common, "--out", str(tmp_path / "fused.csv")))
    alone = {}
    for branch in ("local", "global"):
        alone[branch] = Path(_run("merge.fuse", *sets, *common, "-o", "merge.method=max",
                                  "-o", f"merge.branches=[{branch}]",
                                  "--out", str(tmp_path / f"{branch}.csv")))
    with open(fused) as f:
        rows = list(csv.DictReader(f))
    pairs = [(r["query_id"], r["reference_id"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert len(set(pairs)) == len(pairs) and scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)  # no tie blocks
    with open(alone["local"]) as f:
        assert set(pairs) >= {(r["query_id"], r["reference_id"]) for r in csv.DictReader(f)}
    m_fused = _metrics(fused, tmp_path / "fused.json")
    m_local = _metrics(alone["local"], tmp_path / "local.json")
    m_global = _metrics(alone["global"], tmp_path / "global.json")
    assert m_global["micro_ap"] > 0.5  # the global branch alone finds most copies
    assert m_fused["micro_ap"] >= m_local["micro_ap"] - 0.01
    assert m_fused["micro_ap"] > 0.9 and m_fused["recall_at_rank1"] >= m_local["recall_at_rank1"]
