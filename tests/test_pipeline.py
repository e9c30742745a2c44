"""End to end through the pipeline module: the demo with all sockets blocked (every branch and
their fusion, sets in two folders of one name); a slice of the devset with a micro-AP floor."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import pipeline
from common.config import REPO_ROOT
from evaluation.isc_metric import evaluate, load_ground_truth, load_predictions
from tests.conftest import DATA, DEVSET, offline_env, python


def run_pipeline(query: Path, ref: Path, work: Path, out: Path, *opts: str,
                 env: dict | None = None) -> Path:
    """``python -m copydet run`` (what ``make all`` runs); return the submission it printed."""
    cmd = [python(), "-m", "copydet", "run", "--queries", str(query), "--references", str(ref),
           "--work", str(work), "--out", str(out), *opts]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                          text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def _same_folder_names(tmp_path: Path) -> tuple[Path, Path]:
    """The demo sets as ``x/images`` and ``y/images``: two folders with one name."""
    query, ref = tmp_path / "x" / "images", tmp_path / "y" / "images"
    shutil.copytree(DATA / "queryimages", query)
    shutil.copytree(DATA / "referenceimages", ref)
    return query, ref


def _pairs(path: Path) -> list[tuple[str, str, float]]:
    with open(path) as f:
        return [(r["query_id"], r["reference_id"], float(r["score"])) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_demo_runs_offline_fuses_the_branches_and_finds_the_copies(tmp_path: Path) -> None:
    env = offline_env()
    blocked = subprocess.run(
        [python(), "-c", "import socket; socket.create_connection(('pypi.org', 443), 3)"],
        env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "network blocked" in blocked.stderr
    query, ref = _same_folder_names(tmp_path)
    work = tmp_path / "work"
    out = run_pipeline(query, ref, work, tmp_path / "submission.csv", env=env)
    assert out == tmp_path / "submission.csv"
    assert out.read_text().splitlines()[0] == "query_id,reference_id,score"
    record = json.loads((work / "pipeline.json").read_text())
    assert record["submission"] == str(out) and set(record["branches"]) == {
        "local", "global", "crop_local"}
    stores = [record["branches"]["local"][k] for k in ("query_store", "reference_store")]
    assert [Path(s).name.split("-")[0] for s in stores] == ["images", "images"]
    assert len({Path(s).parent for s in stores}) == 1 and stores[0] != stores[1]
    assert [s["stage"] for s in record["stages"]][-1] == "merge.fuse"
    assert all(Path(s["output"]).exists() for s in record["stages"])
    logs = list((work / "runs").glob("*/run.log"))
    assert len(logs) >= 8  # one per stage run, a stage may log one per image set
    assert all(" done: 0 input(s) skipped" in log.read_text() for log in logs)

    alone = {}
    for branch in ("local", "global", "crop_local"):
        alone[branch] = run_pipeline(query, ref, work, tmp_path / f"{branch}.csv",
                                     "-o", "merge.method=max", "-o",
                                     f"merge.branches=[{branch}]", env=env)
    fused = _pairs(out)
    pairs = [(q, r) for q, r, _ in fused]
    scores = [s for _, _, s in fused]
    assert len(set(pairs)) == len(pairs) and scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)  # no tie blocks
    assert set(pairs) >= {(q, r) for q, r, _ in _pairs(alone["local"])}
    gt = load_ground_truth(DATA / "gt.csv")
    m = {name: evaluate(load_predictions(path), gt)
         for name, path in [("fused", out), *alone.items()]}
    assert m["global"].micro_ap > 0.5  # the global branch alone finds most copies
    assert m["crop_local"].recall_at_rank1 > 0  # crops of pasted copies find their source
    assert m["fused"].micro_ap >= m["local"].micro_ap - 0.01
    assert m["fused"].micro_ap >= 0.9 and m["fused"].recall_at_p90 >= 0.9
    assert m["fused"].recall_at_rank1 >= m["local"].recall_at_rank1


def test_make_all_chains_the_pipeline_on_same_named_folders(tmp_path: Path) -> None:
    """``make all`` runs ``copydet run``: what it would run, with two sets named ``images``."""
    query, ref = _same_folder_names(tmp_path)
    done = subprocess.run(["make", "-n", "all", f"QUERY={query}", f"REF={ref}",
                           f"WORK={tmp_path / 'work'}"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True)
    run = [line for line in done.stdout.splitlines() if "copydet run" in line]
    assert len(run) == 1 and f"--queries {query} --references {ref}" in run[0]


def _link_slice(tmp_path: Path, n_queries: int, n_other_refs: int) -> tuple[Path, Path, Path]:
    """Folders of symlinks: the first queries of the devset, their references and others."""
    with open(DEVSET / "gt.csv") as f:
        gt = list(csv.DictReader(f))[:n_queries]
    refs = sorted(p.name for p in (DEVSET / "references").iterdir())
    chosen = {f"{r['reference_id']}.jpg" for r in gt if r["reference_id"]}
    chosen |= set(refs[::len(refs) // n_other_refs][:n_other_refs])
    folders = {"queries": [f"{r['query_id']}.jpg" for r in gt], "references": sorted(chosen)}
    for name, files in folders.items():
        (tmp_path / name).mkdir()
        for file in files:
            os.symlink(DEVSET / name / file, tmp_path / name / file)
    with open(tmp_path / "gt.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["query_id", "reference_id"])
        writer.writeheader()
        writer.writerows(gt)
    return tmp_path / "queries", tmp_path / "references", tmp_path / "gt.csv"


@pytest.mark.slow
@pytest.mark.skipif(not DEVSET.is_dir(), reason="../shared/devset is not beside the checkout")
def test_devset_slice_micro_ap_floor(tmp_path: Path) -> None:
    queries, refs, gt = _link_slice(tmp_path, n_queries=120, n_other_refs=300)
    out = run_pipeline(queries, refs, tmp_path / "work", tmp_path / "submission.csv")
    metrics = evaluate(load_predictions(out), load_ground_truth(gt))
    assert metrics.n_positives >= 40
    assert metrics.micro_ap >= 0.97 and metrics.recall_at_p90 >= 0.95, metrics.to_dict()


def test_record_runs_a_stage_once_per_inputs_and_measures_it() -> None:
    """A second branch asking for the same stage on the same inputs (the reference features)
    gets the first output; other inputs run the stage again."""
    record = pipeline.Record()
    calls: list[tuple] = []

    def stage(*args: object) -> Path:
        calls.append(args)
        return Path(f"out-{len(calls)}")

    refs, crops = object(), object()
    assert record("s", "refs", stage, refs) == record("s", "refs", stage, refs) == Path("out-1")
    assert record("s", "crops", stage, crops) == Path("out-2") and len(calls) == 2
    assert [s["label"] for s in record.stages] == ["refs", "crops"]
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in record.stages)


@pytest.mark.slow
def test_crop_global_branch_is_read_by_the_fusion(tmp_path: Path) -> None:
    """With ``crop_global`` in ``merge.branches``, the detector's global crops get descriptors
    and a search of their own, and the fusion reads their similarities: a query with a crop
    has its own crop similarity for its pairs, a query without one the missing value."""
    from merge.branches import selected
    from merge.evidence import GLOBAL_MISSING
    from merge.features import feature_names
    from merge.fusion import FusionModel

    branches = ["local", "global", "crop_local", "crop_global"]
    names = feature_names(selected(branches))
    n = len(names)
    model = FusionModel(names, [0.0] * n, [1.0] * n, [1.0] * n, 0.0, "test")
    out = run_pipeline(DATA / "queryimages", DATA / "referenceimages", tmp_path / "work",
                       tmp_path / "sub.csv", "-o", f"merge.branches=[{','.join(branches)}]",
                       "-o", f"merge.fusion_model={model.save(tmp_path / 'fusion.json')}")
    record = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    crop_pairs = Path(record["branches"]["crop_global"]["pairs"])
    boxes = Path(record["branches"]["crop_global"]["boxes"])
    with open(boxes) as f:
        cropped = {r["query_id"] for r in csv.DictReader(f) if "global" in r["used_for"]}
    assert cropped and crop_pairs.exists()
    with open(crop_pairs) as f:
        assert {r["query_id"] for r in csv.DictReader(f)} == cropped
    with open(out.with_name("sub.features.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        found = (float(row["crop_global_sim"]), float(row["crop_global_norm"])) != GLOBAL_MISSING
        assert found == (row["query_id"] in cropped), row
