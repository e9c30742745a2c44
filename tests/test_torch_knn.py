"""Exact k-NN with torch (``common.torch_knn``) on the CPU against Faiss' exact search
(``common.knn``), the choice of backend, ``bench.gpu_check`` without a GPU and the comparison
the GPU checks make (``tests.gpu_compare``)."""

from __future__ import annotations

import itertools
import logging
import subprocess

import numpy as np
import pytest
import torch

from common import UserError, knn
from common.config import load_config
from common.torch_knn import (
    FLT_MAX,
    MIN_SPLIT_ROWS,
    TorchFlatIndex,
    products,
    storage_dtype,
    tile_topk,
)
from local_fea.index import block_rows
from tests.conftest import REPO_ROOT, offline_env, python
from tests.gpu_compare import compare_knn

TWO_CPUS = knn.torch_backend(["cpu", "cpu"])


def _float_data(seed: int, n_ref: int, n_q: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_ref, dim)).astype(np.float32),
            rng.standard_normal((n_q, dim)).astype(np.float32))


def _integer_data(seed: int, n_ref: int, n_q: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integer vectors (exact distances in float32) with duplicates: many exact ties."""
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 6, (n_ref, dim)).astype(np.float32)
    refs[50:70] = refs[3]  # twenty copies of one reference
    queries = rng.integers(0, 6, (n_q, dim)).astype(np.float32)
    queries[:4] = refs[3]  # their nearest neighbours: the twenty-one copies, all tied
    return refs, queries


def _blocks(refs: np.ndarray, cuts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference blocks cut at ``cuts`` (empty blocks included), ids 7 + 3 x row."""
    ids = 7 + 3 * np.arange(len(refs), dtype=np.int64)
    edges = [0, *cuts, len(refs)]
    return [(refs[a:b], ids[a:b]) for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("metric", [knn.L2, knn.IP])
def test_torch_search_equals_faiss_exact_search(metric: str) -> None:
    refs, queries = _float_data(0, 3000, 200, 32)
    blocks = _blocks(refs, [1000, 2200])
    d_ref, i_ref = knn.exact_search(queries, blocks, 10, False, metric)
    d_t, i_t = knn.exact_search(queries, blocks, 10, knn.torch_backend(["cpu"]), metric)
    np.testing.assert_array_equal(i_t, i_ref)
    np.testing.assert_allclose(d_t, d_ref, rtol=1e-4, atol=1e-3)
    assert (np.diff(d_t, axis=1) >= 0).all() if metric == knn.L2 else (
        np.diff(d_t, axis=1) <= 0).all()


@pytest.mark.parametrize("metric", [knn.L2, knn.IP])
def test_streamed_blocks_on_several_devices_equal_faiss(metric: str) -> None:
    """L2 on integer vectors full of exact ties (Faiss' result reproduced bit for bit, ties
    included); inner products on float vectors (which of several exactly equal similarities
    Faiss keeps at the k-th place depends on its heap's history: ``common.torch_knn``)."""
    exact = metric == knn.L2
    refs, queries = (_integer_data if exact else _float_data)(1, 700, 60, 16)
    blocks = _blocks(refs, [0, 130, 130, 400])  # two empty blocks

    def check(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]):
        np.testing.assert_array_equal(got[1], expected[1])  # same ids, same order
        if exact:  # integer data: exact distances
            np.testing.assert_array_equal(got[0], expected[0])
        else:
            np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-4)

    expected = knn.exact_search(queries, blocks, 12, False, metric, query_batch=25)
    for backend in (TWO_CPUS, knn.torch_backend(["cpu"] * 3)):
        check(knn.exact_search(queries, blocks, 12, backend, metric, query_batch=25), expected)
    # one resident index, small tiles and segments: the per-tile, per-segment and
    # per-device merges all run
    index = TorchFlatIndex(16, ["cpu", "cpu", "cpu"], metric, query_tile=7, ref_tile=33,
                           segment_rows=50)
    for vectors, ids in blocks:
        index.add(vectors, ids)
    assert index.ntotal == 700 and all(len(s) > 1 for s in index.segments)
    all_ids = np.concatenate([i for _, i in blocks])
    got = index.search(queries, 12)
    check(got, knn.exact_search(queries, [(refs, all_ids)], 12, False, metric))
    if exact:  # 21 copies at distance 0: the 12 with the smallest ids are kept
        assert got[1][0].tolist() == [7 + 3 * r for r in [3, *range(50, 61)]]


def test_inner_product_ties_are_listed_as_faiss_lists_them() -> None:
    rng = np.random.default_rng(8)
    refs = rng.integers(0, 3, (300, 8)).astype(np.float32)
    refs[[20, 90, 91, 250]] = 4  # four copies with the largest inner product
    queries = np.ones((3, 8), np.float32)
    blocks = _blocks(refs, [100, 200])
    expected = knn.exact_search(queries, blocks, 6, False, knn.IP)
    got = knn.exact_search(queries, blocks, 6, TWO_CPUS, knn.IP)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1][0, :4].tolist() == [7 + 3 * r for r in (250, 91, 90, 20)]  # by id, down


def test_ties_across_the_kth_place_keep_the_smallest_ids() -> None:
    dist = torch.zeros((2, 100))
    dist[1, 40] = -1.0  # one clear best, then 99 ties
    ids = torch.arange(100, dtype=torch.int64).flip(0)  # ids not in column order
    values, found = tile_topk(dist, ids, 3, largest=False)
    assert found.tolist() == [[0, 1, 2], [59, 0, 1]]
    assert values.tolist() == [[0, 0, 0], [-1, 0, 0]]
    values, found = tile_topk(-dist, ids, 3, largest=True)  # inner products: Faiss' order
    assert found.tolist() == [[2, 1, 0], [59, 1, 0]]


@pytest.mark.parametrize("metric", [knn.L2, knn.IP])
def test_k_larger_than_the_references_pads_with_minus_one(metric: str) -> None:
    refs, queries = _float_data(2, 5, 9, 8)
    blocks = _blocks(refs, [2])
    expected = knn.exact_search(queries, blocks, 8, False, metric)
    got = knn.exact_search(queries, blocks, 8, TWO_CPUS, metric)
    np.testing.assert_array_equal(got[1], expected[1])
    assert (got[1][:, 5:] == -1).all() and (got[1][:, :5] >= 0).all()
    assert (got[0][:, 5:] == (-FLT_MAX if metric == knn.IP else FLT_MAX)).all()
    np.testing.assert_array_equal(got[0][:, 5:], expected[0][:, 5:])
    np.testing.assert_allclose(got[0][:, :5], expected[0][:, :5], rtol=1e-5, atol=1e-5)


def test_no_references_and_no_queries() -> None:
    _, queries = _float_data(3, 1, 4, 8)
    empty = (np.zeros((0, 8), np.float32), np.zeros(0, np.int64))
    for blocks in ([], [empty, empty]):
        dist, ids = knn.exact_search(queries, blocks, 3, TWO_CPUS)
        expected = knn.exact_search(queries, blocks, 3, False)
        np.testing.assert_array_equal(ids, expected[1])
        np.testing.assert_array_equal(dist, expected[0])
        assert (ids == -1).all()
    index = TorchFlatIndex(8, ["cpu", "cpu"])
    dist, ids = index.search(queries, 3)
    assert (ids == -1).all() and (dist == FLT_MAX).all()
    index.add(*_float_data(4, 10, 1, 8)[:1], np.arange(10))
    dist, ids = index.search(np.zeros((0, 8), np.float32), 3)
    assert dist.shape == (0, 3) and ids.shape == (0, 3)


def test_add_spreads_over_the_devices_and_leaves_the_callers_arrays_alone() -> None:
    refs, queries = _float_data(5, 3 * MIN_SPLIT_ROWS, 5, 4)
    refs *= 1000  # scaled by a power of two inside: the caller's arrays must not change
    kept_refs, kept_queries = refs.copy(), queries.copy()
    index = TorchFlatIndex(4, ["cpu", "cpu", "cpu"])
    index.add(refs, np.arange(len(refs)))
    assert [index._rows(d) for d in range(3)] == [MIN_SPLIT_ROWS] * 3  # a large block: split
    index.add(refs[:10], np.arange(10) + len(refs))  # a small one: the least-filled device
    assert sorted(index._rows(d) for d in range(3)) == [MIN_SPLIT_ROWS] * 2 + [MIN_SPLIT_ROWS
                                                                                + 10]
    index.search(queries, 4)
    np.testing.assert_array_equal(refs, kept_refs)
    np.testing.assert_array_equal(queries, kept_queries)
    index.reset()
    assert index.ntotal == 0 and not any(index.segments)


def test_float16_storage_keeps_the_neighbours_of_rootsift_like_descriptors() -> None:
    """Norms of 512 overflow float16 products unless scaled: the fp16 path (used on CUDA,
    here on the CPU) must still find the planted neighbours, distances within rounding."""
    rng = np.random.default_rng(6)
    refs = rng.random((4000, 128), dtype=np.float32) ** 3
    refs = np.round(refs * 512 / np.linalg.norm(refs, axis=1, keepdims=True))
    queries = np.clip(refs[:100] + np.round(rng.normal(0, 4, (100, 128))), 0, 255)
    queries = queries.astype(np.float32)
    blocks = _blocks(refs, [1500])
    expected = knn.exact_search(queries, blocks, 10, False)
    half = knn.torch_backend(["cpu", "cpu"], cpu_dtype="float16")
    assert half.label == "torch cpu x2 fp16"
    dist, ids = knn.exact_search(queries, blocks, 10, half)
    assert np.isfinite(dist).all()
    np.testing.assert_array_equal(ids[:, 0], expected[1][:, 0])  # the planted copies
    tolerance = 2.0**-9 * 2 * 512**2
    assert np.abs(dist - expected[0]).max() < tolerance
    # every other difference is a tie within that rounding (checked against exact distances)
    vectors = np.concatenate([v for v, _ in blocks])
    by_row = (ids - 7) // 3, (expected[1] - 7) // 3
    result = compare_knn(queries, vectors, (expected[0], by_row[1]), (dist, by_row[0]), knn.L2)
    assert result["ok"] and result["agreement"] > 0.8, result


def test_products_in_float16_and_storage_dtypes() -> None:
    a = torch.randn(5, 16).div(4).half()
    b = torch.randn(7, 16).div(4).half()
    exact = a.float() @ b.float().t()
    got = products(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=0, atol=2e-3)
    assert storage_dtype("cpu") == torch.float32
    assert storage_dtype("cuda:0") == torch.float16
    assert storage_dtype("cuda:1", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        storage_dtype("cpu", "int8")


def test_auto_on_a_machine_without_gpus_is_the_cpu(caplog) -> None:
    conf = load_config()
    knn._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="common.knn"):
        for section in ("local_search", "global_search"):
            backend = knn.select_backend(conf[section], section)
            assert backend == knn.CPU and backend.label == "faiss-cpu" and not backend.gpu
            assert knn.use_gpu(conf[section], section) is False
    assert "local_search: exact search on faiss-cpu" in caplog.text
    assert "global_search: exact search on faiss-cpu" in caplog.text
    assert knn.select_backend({"gpu": False}, "x") == knn.CPU
    assert knn.backend_of(True) == knn.CPU and knn.backend_of(False) == knn.CPU


def test_true_without_gpus_is_a_one_line_error() -> None:
    for section in ("local_search", "global_search"):
        with pytest.raises(UserError) as err:
            knn.select_backend({"gpu": True}, section)
        assert str(err.value).startswith(f"{section}.gpu is true but no GPU is usable")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="must be auto, true or false"):
        knn.select_backend({"gpu": "yes"}, "local_search")


def test_backend_choice_with_gpus(monkeypatch) -> None:
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 0)
    monkeypatch.setattr(knn, "cuda_devices", lambda: ["cuda:0", "cuda:1"])
    backend = knn.select_backend({"gpu": "auto"}, "local_search")
    assert backend == knn.torch_backend(["cuda:0", "cuda:1"])
    assert backend.label == "torch cuda x2 fp16" and backend.gpu and backend.n_gpus == 2
    assert knn.select_backend({"gpu": True}, "local_search") == backend
    assert knn.select_backend({"gpu": False}, "local_search") == knn.CPU
    assert knn.backend_of(True) == backend
    conf = load_config()["local_search"]
    assert block_rows(conf, backend) == conf["gpu_block_mb"] * 2**20 // (2 * 128 + 12) * 2
    assert block_rows(conf, False) == conf["block_mb"] * 2**20 // (4 * 128)
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 3)  # faiss-gpu stays the first choice
    backend = knn.select_backend({"gpu": "auto"}, "global_search")
    assert backend.kind == knn.FAISS_GPU and backend.label == "faiss-gpu x3"
    assert block_rows(conf, backend) == conf["gpu_block_mb"] * 2**20 // (2 * 128) * 3


def test_gpu_check_without_a_gpu_says_so() -> None:
    done = subprocess.run([python(), "-m", "bench.gpu_check"], cwd=REPO_ROOT,
                          env=offline_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [done.stdout.strip()]
    assert done.stdout.startswith("no GPU: torch sees no CUDA device")


def test_gpu_check_comparison_flags_a_wrong_neighbour() -> None:
    refs, queries = _float_data(7, 500, 20, 16)
    ids = np.arange(500, dtype=np.int64)
    reference = knn.exact_search(queries, [(refs, ids)], 5, False)
    same = compare_knn(queries, refs, reference, reference, knn.L2)
    assert same["ok"] and same["agreement"] == 1.0 and same["unexplained"] == 0
    far = np.argmax(((refs - queries[0]) ** 2).sum(1))
    wrong_d, wrong_i = reference[0].copy(), reference[1].copy()
    wrong_i[0, 2] = far  # a far reference in place of the third neighbour
    result = compare_knn(queries, refs, reference, (wrong_d, wrong_i), knn.L2)
    assert not result["ok"] and result["unexplained"] == 1
    off_d = reference[0].copy()
    off_d[3, 0] += 1.0  # a distance off by far more than float16 rounding
    assert not compare_knn(queries, refs, reference, (off_d, reference[1]), knn.L2)["ok"]
