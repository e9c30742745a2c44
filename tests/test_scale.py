"""Scaling out: Dask execution, streamed exact search, incremental and removed references,
every GPU of a node for the torch stages (CPU fallbacks)."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import pipeline
from common import UserError, devices, knn
from common.config import load_config
from common.devices import torch_device, torch_devices
from common.images import list_images
from common.knn import FlatIndex
from common.parallel import connect, execution
from common.shards import ShardStore
from local_fea import extract, search
from local_fea.index import (
    ExactSearch,
    ReferenceIndex,
    exact_search,
    reference_blocks,
    use_gpu,
)
from tests.conftest import DATA, DEFAULT_INDEX, REPO_ROOT, python

GT = {r["query_id"]: r["reference_id"] for r in csv.DictReader(
    (DATA / "gt.csv").read_text().splitlines())}


def _copy(names: list[str], src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".pkl", ".csv", ".json")}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _pipeline(conf: dict, queries: Path, refs: Path, work: Path) -> tuple[Path, Path]:
    """The local branch; return the candidates and the scored pairs."""
    out = pipeline.run_local(conf, list_images(queries), list_images(refs), work,
                             pipeline.Record())
    return out["candidates"], out["pairs"]


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def demo_sets(tmp_path_factory) -> tuple[Path, Path]:
    """12 queries (8 copies) and 24 references of the demo set."""
    root = tmp_path_factory.mktemp("demo")
    queries = sorted(GT)[:12]
    refs = {GT[q] for q in queries if GT[q]}
    refs |= set(sorted({f"R{i:06d}" for i in range(40)} - refs)[:24 - len(refs)])
    return (_copy([f"{q}.jpg" for q in queries], DATA / "queryimages", root / "queries"),
            _copy([f"{r}.jpg" for r in sorted(refs)], DATA / "referenceimages",
                  root / "references"))


@pytest.mark.slow
def test_dask_local_cluster_run_equals_local_run(cluster, demo_sets, tmp_path: Path) -> None:
    queries, refs = demo_sets
    conf = load_config(overrides=["run.shard_size=4", "run.n_jobs=2",
                                  "match_score.chunk_pairs=16"])
    local = _pipeline(conf, queries, refs, tmp_path / "local")
    with execution({"scheduler": cluster.scheduler_address}) as client:
        assert client is not None
        on_dask = _pipeline(conf, queries, refs, tmp_path / "dask")
    for a, b in zip(local, on_dask, strict=True):
        assert a.read_bytes() == b.read_bytes()
    for stage in ("local_fea", "local_search", "match_score"):
        assert _files(tmp_path / "local" / stage) == _files(tmp_path / "dask" / stage)

    # the command line: --scheduler on any stage
    cmd = [python(), "-m", "local_fea.extract", "--images", str(refs), "--work",
           str(tmp_path / "cli"), "-o", "run.shard_size=4",
           "--scheduler", cluster.scheduler_address]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Dask scheduler" in done.stderr
    assert _files(tmp_path / "cli" / "local_fea") == {
        k: v for k, v in _files(tmp_path / "local" / "local_fea").items()
        if k.split("/")[1].startswith("references-")}


def test_unreachable_scheduler_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot connect to the Dask scheduler"):
        connect("tcp://127.0.0.1:9", timeout=1)
    cmd = [python(), "-m", "local_fea.extract", "--images", str(DATA / "referenceimages"),
           "--work", str(tmp_path), "--scheduler", "tcp://127.0.0.1:9",
           "-o", "run.n_jobs=1"]
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and "error: cannot connect to the Dask scheduler" in done.stderr


@pytest.fixture(scope="module")
def demo_features(demo_sets, tmp_path_factory) -> tuple[ShardStore, ShardStore]:
    queries, refs = demo_sets
    conf = load_config(overrides=["run.shard_size=4", "run.n_jobs=2"])
    work = tmp_path_factory.mktemp("features")
    return (ShardStore(extract.main(conf, queries, work, mirror=True)),
            ShardStore(extract.main(conf, refs, work)))


def test_streamed_exact_search_equals_one_shot(demo_features) -> None:
    query_store, ref_store = demo_features
    queries = np.concatenate([np.asarray(query_store.load(k)["views"][v]["desc"]["data"])
                              for k in range(2) for v in ("orig", "mirror")]).astype(np.float32)
    flat = faiss.IndexFlatL2(128)
    blocks = list(reference_blocks(ref_store, range(len(ref_store.shards))))
    flat.add(np.concatenate([d for d, _ in blocks]))
    all_ids = np.concatenate([i for _, i in blocks])
    d_ref, i_ref = flat.search(queries, 10)
    i_ref = all_ids[i_ref]
    assert len(ref_store.shards) == 6 and len(queries) > 2000

    streamed = ExactSearch(ref_store, 10, gpu=False, max_rows=3000, query_batch=500)
    resident = ExactSearch(ref_store, 10, gpu=False, max_rows=10**9, query_batch=10**6)
    for searcher in (streamed, resident, streamed):  # a second call gives the same again
        dist, ids = searcher(queries)
        np.testing.assert_allclose(dist, d_ref, rtol=1e-4, atol=1e-2)
        ties = np.isclose(dist, d_ref[:, -1:], rtol=1e-4)  # the k-th distance may be tied
        assert (ids == i_ref)[~ties].mean() > 0.999
    assert streamed._resident is None and streamed._streams
    assert resident._resident is not None and resident._resident.ntotal == len(all_ids)

    dist, ids = exact_search(queries[:100], blocks, 10, gpu=False, query_batch=7)
    np.testing.assert_allclose(dist, d_ref[:100], rtol=1e-4, atol=1e-2)


def _search_files(work: Path) -> tuple[Path, Path]:
    index_dir = next((work / "local_index").glob("*/references-*"), None)
    return index_dir, next((work / "local_search").glob("*/queries-*-vs-references-*"))


@pytest.mark.parametrize("index", [DEFAULT_INDEX, "Flat"])
def test_incremental_add_gives_the_candidates_of_a_rebuild(demo_sets, tmp_path: Path,
                                                           index: str) -> None:
    queries, all_refs = demo_sets
    names = sorted(p.name for p in all_refs.iterdir())
    refs = _copy(names[:16], all_refs, tmp_path / "references")
    conf = load_config(overrides=["run.shard_size=4", "run.n_jobs=2",
                                  f"local_search.index={index}"])
    work = tmp_path / "work"
    query_store = extract.main(conf, queries, work, mirror=True)
    ref_store = extract.main(conf, refs, work)
    before = _rows(search.main(conf, query_store, ref_store, work))

    _copy(names[16:], all_refs, refs)  # 8 more references: two new shards
    assert extract.main(conf, refs, work) == ref_store
    store = ShardStore(ref_store)
    assert len(store.shards) == 6 and store.missing() == []
    incremental = search.main(conf, query_store, ref_store, work).read_bytes()
    index_dir, out = _search_files(work)
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == len(ShardStore(query_store).shards)
    if index != "Flat":  # updated in place: only the two new shards were encoded
        assert ReferenceIndex(index_dir, conf["local_search"], "").parts()[-1][1] == 6
        assert [p.name for p in index_dir.iterdir()] == ["index-6.faiss"]
        logs = "".join(p.read_text() for p in sorted((work / "runs").glob("*search*/run.log")))
        assert logs.index("adding 4 reference shard(s)") < logs.index("adding 2 reference")

    for folder in ("local_search", "local_index"):  # rebuild the index, search from scratch
        shutil.rmtree(work / folder, ignore_errors=True)
    assert search.main(conf, query_store, ref_store, work).read_bytes() == incremental
    after = _rows(search.main(conf, query_store, ref_store, work))
    new_refs = {Path(n).stem for n in names[16:]}
    assert not any(r["reference_id"] in new_refs for r in before)
    found_new = {r["query_id"] for r in after if r["reference_id"] in new_refs
                 and GT[r["query_id"]] == r["reference_id"]}
    assert found_new == {q for q in GT if GT[q] in new_refs and (queries / f"{q}.jpg").exists()}


@pytest.mark.parametrize("index", [DEFAULT_INDEX, "Flat"])
def test_removed_references_leave_the_results(demo_sets, tmp_path: Path, index: str) -> None:
    queries, all_refs = demo_sets
    refs = _copy(sorted(p.name for p in all_refs.iterdir()), all_refs, tmp_path / "references")
    conf = load_config(overrides=["run.shard_size=4", "run.n_jobs=2",
                                  f"local_search.index={index}"])
    work = tmp_path / "work"
    first, first_pairs = _pipeline(conf, queries, refs, work)
    rows = _rows(first)
    gone = sorted({GT[q] for q in GT if GT[q] and any(r["reference_id"] == GT[q]
                                                       for r in rows)})[:2]
    assert len(gone) == 2
    moved = tmp_path / "taken-down"
    moved.mkdir()
    for ref in gone:
        shutil.move(refs / f"{ref}.jpg", moved / f"{ref}.jpg")
    candidates, pairs = _pipeline(conf, queries, refs, work)
    store = ShardStore(next((work / "local_fea").glob("*/references-*-ref")))
    assert store.removed == set(gone) and len(store) == 24  # features kept, ids listed
    assert not any(r["reference_id"] in gone for r in _rows(candidates))
    assert not any(r["reference_id"] in gone for r in _rows(pairs))
    assert {r["query_id"] for r in _rows(pairs)} == {r["query_id"] for r in rows}
    if index != "Flat":  # the index was not touched: removed images are filtered out
        index_dir, _ = _search_files(work)
        assert [p.name for p in index_dir.iterdir()] == ["index-6.faiss"]
        assert ReferenceIndex(index_dir, conf["local_search"], "").parts()[-1][1] == 6

    for ref in gone:  # back again: the same candidates as before
        shutil.move(moved / f"{ref}.jpg", refs / f"{ref}.jpg")
    candidates, pairs = _pipeline(conf, queries, refs, work)
    assert ShardStore(store.root).removed == frozenset()
    again = {(r["query_id"], r["view"], r["reference_id"]) for r in _rows(candidates)}
    assert again == {(r["query_id"], r["view"], r["reference_id"]) for r in rows}
    assert pairs.read_bytes() == first_pairs.read_bytes()


def test_store_lists_images_gone_from_the_folder(photos: Path, tmp_path: Path) -> None:
    store = ShardStore.plan(tmp_path / "store", list_images(photos), 4)
    revision = store.revision
    gone = sorted(photos.iterdir())[1]
    gone.unlink()
    store = ShardStore.plan(tmp_path / "store", list_images(photos), 4)
    assert store.removed == {gone.stem} and len(store) == 6 and store.revision != revision
    assert store.removed_numbers() == [1]
    assert json.loads((store.root / "manifest.json").read_text())["removed"] == [gone.stem]
    shutil.copy(sorted(photos.iterdir())[0], gone)
    store = ShardStore.plan(tmp_path / "store", list_images(photos), 4)
    assert store.removed == frozenset() and store.revision == revision


def test_torch_devices_without_gpus_are_the_cpu() -> None:
    assert torch_devices("auto", "k") == ["cpu"] and torch_device("auto", "k") == "cpu"
    assert torch_devices("cpu", "k") == ["cpu"]
    assert torch_devices(["cpu", "cpu"], "k") == torch_devices("cpu, cpu", "k") == ["cpu"] * 2
    for name in ("cuda", "cuda:0", 0, "1"):
        with pytest.raises(UserError, match="torch sees no GPU"):
            torch_devices(name, "global_fea.device")
    with pytest.raises(UserError, match="expected auto, cpu, cuda"):
        torch_devices("tpu", "preprocess.device")


def test_torch_devices_are_every_visible_gpu(monkeypatch) -> None:
    monkeypatch.setattr(devices, "torch_gpus", lambda: 3)  # what CUDA_VISIBLE_DEVICES leaves
    every = ["cuda:0", "cuda:1", "cuda:2"]
    assert devices.cuda_devices() == every
    assert torch_devices("auto", "k") == torch_devices("cuda", "k") == every
    assert torch_devices("cuda:2", "k") == ["cuda:2"] and torch_devices(1, "k") == ["cuda:1"]
    assert torch_devices("0,2", "k") == ["cuda:0", "cuda:2"]
    assert torch_device("auto", "k") == torch_device("cuda", "k") == "cuda:0"
    with pytest.raises(UserError, match="sees only 3 GPU"):
        torch_devices("cuda:3", "k")


def test_without_gpus_everything_runs_on_cpu() -> None:
    conf = load_config()["local_search"]
    assert use_gpu(conf) is False
    with pytest.raises(UserError, match="gpu is true but no GPU is usable"):
        use_gpu({**conf, "gpu": True})
    index = FlatIndex(128, gpu=True)  # asks for GPUs, finds none: one CPU index
    index.add(np.eye(128, dtype=np.float32), np.arange(128) + 1000)
    dist, ids = index.search(np.eye(128, dtype=np.float32)[:3], 2)
    assert ids[:, 0].tolist() == [1000, 1001, 1002] and dist[:, 0].tolist() == [0, 0, 0]
    assert ids.shape == (3, 2)
    assert ExactSearch(ShardStore.__new__(ShardStore), 10, True, 1).backend == knn.CPU


def test_exact_search_on_torch_devices_equals_faiss(demo_features) -> None:
    query_store, ref_store = demo_features
    queries = np.concatenate([np.asarray(query_store.load(k)["views"]["orig"]["desc"]["data"])
                              for k in range(2)]).astype(np.float32)
    expected = ExactSearch(ref_store, 10, False, 10**9)(queries)
    two_cpus = knn.torch_backend(["cpu", "cpu"])
    streamed = ExactSearch(ref_store, 10, two_cpus, max_rows=3000, query_batch=300)
    resident = ExactSearch(ref_store, 10, two_cpus, max_rows=10**9, query_batch=10**6)
    for searcher in (streamed, resident, resident):  # the resident block is searched again
        dist, ids = searcher(queries)
        np.testing.assert_array_equal(ids, expected[1])  # uint8 descriptors: exact distances,
        np.testing.assert_array_equal(dist, expected[0])  # so ties fall the same way too
    assert streamed._streams and resident._resident.ntotal > 3000


def test_global_descriptors_on_several_devices_equal_one_device(conf) -> None:
    from global_fea import extract as global_extract
    from global_fea import weights

    section = {**conf["global_fea"], "batch_size": 3, "device": "cpu,cpu"}
    devs = global_extract.devices_of(section)
    assert devs == [torch.device("cpu")] * 2 and global_extract.device_of(section) == devs[0]
    model = weights.build(section)
    paths = [str(p) for p in sorted((DATA / "referenceimages").glob("*.jpg"))[:8]]
    one = list(global_extract.describe_batches(model, paths, section, True, devs[0], 0))
    two = list(global_extract.describe_batches([model, copy.deepcopy(model)], paths, section,
                                               True, devs, 0))
    assert [len(r) for _, _, r in two] == [len(r) for _, _, r in one] == [3, 3, 2]
    for (desc, mirror, reasons), (desc2, mirror2, reasons2) in zip(one, two, strict=True):
        # same batches, in order (two CPU threads at once may round differently in the last
        # bits; distinct images differ by far more)
        np.testing.assert_allclose(desc2, desc, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(mirror2, mirror, rtol=1e-4, atol=1e-6)
        assert reasons2 == reasons


def test_detector_on_several_devices_equals_one_device(tmp_path: Path) -> None:
    from preprocess.detect import Detector

    pconf = {**load_config()["preprocess"], "batch": 2}
    one = Detector({**pconf, "device": "cpu"}, 1, tmp_path / "yolo")
    two = Detector({**pconf, "device": "cpu,cpu"}, 1, tmp_path / "yolo")
    assert two.devices == ["cpu", "cpu"] and two.models[0] is not two.models[1]
    smalls = [one.small(p) for p in sorted((DATA / "queryimages").glob("*.jpg"))[:7]]
    images, sizes = [s for s, _ in smalls], [z for _, z in smalls]
    boxes = one.detect(images, sizes)
    assert len(boxes) == 7 and any(boxes)
    found = two.detect(images, sizes)  # four batches over two replicas, in order
    assert [len(b) for b in found] == [len(b) for b in boxes]
    for mine, theirs in zip(found, boxes, strict=True):  # up to the last bits (two threads)
        for a, b in zip(mine, theirs, strict=True):
            assert np.allclose([a.x1, a.y1, a.x2, a.y2, a.conf],
                               [b.x1, b.y1, b.x2, b.y2, b.conf], rtol=1e-4, atol=1e-3)
