"""Local search: voting, exact streamed search, the IVF index and the search stage."""

from __future__ import annotations

import csv
from pathlib import Path

import faiss
import numpy as np
import pytest

import pipeline
from common import UserError
from common.config import load_config
from common.shards import ShardStore
from local_fea import extract, search
from local_fea.index import (
    AUTO_INDEXES,
    ROW_BITS,
    concrete_index,
    decode_images,
    encode_ids,
    exact_search,
    reference_blocks,
)
from tests.conftest import DATA, DEFAULT_INDEX


def test_vote_soft_ratio_weights_and_one_vote_per_descriptor() -> None:
    ref = lambda image, row=0: (image << ROW_BITS) | row  # noqa: E731
    # two query descriptors of unit 0, one of unit 1; squared distances, k = 3
    dist = np.array([[1.0, 2.0, 4.0], [1.0, 1.0, 4.0], [3.0, 3.5, 4.0]])
    ids = np.array([[ref(7), ref(7, 1), ref(9)],   # image 7 twice: counted once
                    [ref(9), ref(8), ref(7)],
                    [ref(5), ref(6), -1]])
    units = np.array([0, 0, 1])
    out = search.vote(units, dist, ids, candidates=2)
    # unit 0: image 7 gets 1 - 1/4 = 0.75 (its second hit is ignored) + 0 (k-th) = 0.75,
    # image 9 gets 0 (k-th neighbour) + 0.75 = 0.75, image 8 gets 0.75: ties by image number
    assert out[:2] == [(0, 7, 0.75, 0), (0, 8, 0.75, 1)]
    # unit 1 found only two neighbours: the last found one (image 6) plays the k-th, so
    # image 5 gets 1 - 3/3.5 and image 6 nothing
    assert out[2:] == [(1, 5, pytest.approx(1 - 3 / 3.5), 0)]


def test_vote_equals_a_plain_count_per_query_view() -> None:
    rng = np.random.default_rng(3)
    n, k = 3000, 10
    units = np.sort(rng.integers(0, 40, n))
    dist = np.sort(rng.random((n, k)), axis=1).astype(np.float32)
    images = rng.integers(0, 60, (n, k))
    ids = np.where(rng.random((n, k)) < 0.05, -1, (images << ROW_BITS) | 3)
    votes: dict[int, dict[int, float]] = {}
    for unit, d, row in zip(units, dist, ids, strict=True):
        found = row >= 0
        far = d[found].max() if found.any() else 0
        seen = set()
        for dj, i in zip(d, row, strict=True):
            image = int(i >> ROW_BITS)
            if i < 0 or image in seen or far <= 0:
                continue
            seen.add(image)
            votes.setdefault(int(unit), {}).setdefault(image, 0.0)
            votes[int(unit)][image] += max(0.0, 1 - float(dj) / float(far))
    expected = []
    for unit in sorted(votes):
        ranked = sorted((-v, image) for image, v in votes[unit].items() if v > 0)[:5]
        expected += [(unit, image, -v, rank) for rank, (v, image) in enumerate(ranked)]
    got = search.vote(units, dist, ids, candidates=5)
    assert [(u, r, rank) for u, r, _, rank in got] == [(u, r, rank) for u, r, _, rank in expected]
    assert np.allclose([v for *_, v, _ in got], [v for *_, v, _ in expected])


def test_vote_of_nothing_is_nothing_and_too_large_numbers_are_refused() -> None:
    none = search.vote(np.zeros(0, np.int64), np.zeros((0, 10), np.float32),
                       np.zeros((0, 10), np.int64), candidates=5)
    assert none == []
    dist = np.array([[1.0, 2.0]], np.float32)
    with pytest.raises(ValueError, match="2\\^32"):
        search.vote(np.array([0]), dist, np.array([[(2**32 + 7) << ROW_BITS, 7 << ROW_BITS]]), 5)


def test_ids_round_trip() -> None:
    ids = encode_ids(12345, 3)
    assert decode_images(np.append(ids, -1)).tolist() == [12345] * 3 + [-1]
    assert (ids & ((1 << ROW_BITS) - 1)).tolist() == [0, 1, 2]


def test_streamed_exact_search_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.random((n, 128), dtype=np.float32) for n in (50, 3, 80, 40)]
    ids = [np.arange(len(b)) + 1000 * i for i, b in enumerate(blocks)]
    queries = rng.random((30, 128), dtype=np.float32)
    dist, idx = exact_search(queries, zip(blocks, ids, strict=True), k=5, gpu=False)
    flat = faiss.IndexFlatL2(128)
    flat.add(np.concatenate(blocks))
    d_ref, i_ref = flat.search(queries, 5)
    np.testing.assert_allclose(dist, d_ref, rtol=1e-5)
    np.testing.assert_array_equal(idx, np.concatenate(ids)[i_ref])


@pytest.fixture(scope="module")
def demo_stores(tmp_path_factory) -> tuple[dict, Path, Path, Path]:
    from common.config import load_config

    conf = load_config(overrides=["run.shard_size=16"])
    work = tmp_path_factory.mktemp("work")
    refs = extract.main(conf, DATA / "referenceimages", work)
    queries = extract.main(conf, DATA / "queryimages", work, mirror=True)
    return conf, work, refs, queries


def _top1(candidates: Path) -> dict[str, str]:
    best: dict[str, tuple[float, str]] = {}
    with open(candidates) as f:
        for row in csv.DictReader(f):
            votes = float(row["votes"])
            if votes > best.get(row["query_id"], (-1.0, ""))[0]:
                best[row["query_id"]] = (votes, row["reference_id"])
    return {q: r for q, (_, r) in best.items()}


@pytest.mark.parametrize("index", [DEFAULT_INDEX, "Flat"])
def test_search_stage_finds_the_copies(demo_stores, index: str) -> None:
    conf, work, refs, queries = demo_stores
    conf = {**conf, "local_search": {**conf["local_search"], "index": index}}
    candidates = search.main(conf, queries, refs, work)
    with open(DATA / "gt.csv") as f:
        gt = {r["query_id"]: r["reference_id"] for r in csv.DictReader(f) if r["reference_id"]}
    top1 = _top1(candidates)
    hits = sum(top1.get(q) == r for q, r in gt.items())
    assert hits >= 0.8 * len(gt)
    with open(candidates) as f:
        rows = list(csv.DictReader(f))
    per_view = {}
    for r in rows:
        per_view.setdefault((r["query_id"], r["view"]), []).append(int(r["rank"]))
    assert all(ranks == list(range(len(ranks))) for ranks in per_view.values())
    assert max(len(v) for v in per_view.values()) == conf["local_search"]["candidates"]
    assert {v for _, v in per_view} == {"orig", "mirror"}


def _ranked(candidates: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    with open(candidates) as f:
        for row in csv.DictReader(f):
            out.setdefault((row["query_id"], row["view"]), []).append(
                (row["reference_id"], row["votes"]))
    return out


def test_a_store_searched_in_itself_skips_each_query_s_own_image(demo_stores) -> None:
    """With ``skip_same_id`` (``copydet dedupe``) no query view is its own candidate: its
    list is the one without the setting less its own image, one more reference after it."""
    conf, work, _, queries = demo_stores
    kept, skipped = (_ranked(search.main(
        {**conf, "local_search": {**conf["local_search"], "skip_same_id": skip}}, queries,
        queries, work)) for skip in (False, True))
    assert kept.keys() == skipped.keys()
    with_own = [key for key, ranked in kept.items() if key[0] in {r for r, _ in ranked}]
    assert len(with_own) >= len(kept) / 2  # every original view finds itself, most mirrors
    for (query, view), ranked in skipped.items():
        others = [rv for rv in kept[(query, view)] if rv[0] != query]
        assert query not in {r for r, _ in ranked}
        assert ranked[:len(others)] == others  # the same votes: nothing else changed
        assert len(ranked) <= conf["local_search"]["candidates"]
    assert sum(len(skipped[k]) > len(kept[k]) - 1 for k in with_own) >= len(with_own) / 2


def _candidate_sets(candidates: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with open(candidates) as f:
        for row in csv.DictReader(f):
            out.setdefault(row["query_id"], set()).add(row["reference_id"])
    return out


@pytest.mark.parametrize("index", [DEFAULT_INDEX, AUTO_INDEXES[-1].factory])
def test_the_auto_indexes_keep_the_copies_exact_search_finds(demo_stores, index) -> None:
    """The default IVF index (and the large-set index ``auto`` picks at a million references)
    puts every true copy that exact search puts among a query's candidates there too (the
    IVF4096 index IVF1024 replaced lost one of the demo's), and most of exact search's
    candidates."""
    conf, work, refs, queries = demo_stores
    exact, approx = (_candidate_sets(search.main(
        {**conf, "local_search": {**conf["local_search"], "index": name}}, queries, refs, work))
        for name in ("Flat", index))
    with open(DATA / "gt.csv") as f:
        gt = {r["query_id"]: r["reference_id"] for r in csv.DictReader(f) if r["reference_id"]}
    found = {q for q, r in gt.items() if r in exact.get(q, set())}
    assert len(found) >= 0.8 * len(gt)
    assert found == {q for q, r in gt.items() if r in approx.get(q, set())}
    shared = sum(len(exact[q] & approx.get(q, set())) for q in exact)
    assert shared >= 0.5 * sum(map(len, exact.values()))


def test_auto_index_follows_the_reference_set_size(demo_stores) -> None:
    conf, work, refs, queries = demo_stores
    section = {**conf["local_search"], "index": "auto", "nprobe": "auto"}
    bounds = [a.max_references for a in AUTO_INDEXES[:-1]]
    for step, n_references in enumerate([1, *(b + 1 for b in bounds)]):
        for n in (n_references, bounds[step] if step < len(bounds) else 10**7):
            picked = concrete_index(section, n)
            assert (picked["index"], picked["nprobe"]) == AUTO_INDEXES[step][:2]
    assert concrete_index({**section, "nprobe": 3}, 1)["nprobe"] == 3  # a number given is kept
    assert concrete_index({**section, "index": "Flat"}, 10**6)["index"] == "Flat"
    with pytest.raises(UserError, match="give a number"):
        concrete_index({**section, "index": "IVF4096,SQ8"}, 1)
    candidates = search.main({**conf, "local_search": section}, queries, refs, work)
    assert candidates.parent.parent.name.startswith("IVF1024_PQ64x4fs-np8-")  # named as run
    (index_dir,) = (work / "local_index").glob("IVF1024_PQ64x4fs-*")
    assert list(index_dir.glob("*/index-*.faiss"))


def test_search_resumes_from_parts_and_takes_only_stores(demo_stores) -> None:
    conf, work, refs, queries = demo_stores
    first = search.main(conf, queries, refs, work)
    parts = sorted((first.parent / "parts").iterdir())
    assert len(parts) == len(ShardStore(queries).shards)
    stamp = parts[0].stat().st_mtime_ns
    again = search.main(conf, queries, refs, work)
    assert again == first and parts[0].stat().st_mtime_ns == stamp  # reused, not redone
    with pytest.raises(UserError, match="no store at"):  # an image folder is never a store
        search.main(conf, DATA / "queryimages", refs, work)


def test_changing_nprobe_reuses_the_populated_index(demo_stores) -> None:
    """The populated index depends on the references and the trained index, not on search
    settings: another nprobe searches the same file (it used to re-encode the references)."""
    conf, work, refs, queries = demo_stores
    conf = {**conf, "local_search": {**conf["local_search"], "index": "IVF1024,PQ64x4fs",
                                     "nprobe": 8}}
    search.main(conf, queries, refs, work)
    folder = search.index_folder(conf, refs, work)
    (index_file,) = folder.glob("index-*.faiss")
    stamp = index_file.stat().st_mtime_ns
    other = {**conf, "local_search": {**conf["local_search"], "nprobe": 4}}
    candidates = search.main(other, queries, refs, work)
    assert search.index_folder(other, refs, work) == folder
    assert [p.name for p in folder.iterdir()] == [index_file.name]
    assert index_file.stat().st_mtime_ns == stamp
    assert candidates != search.main(conf, queries, refs, work)  # other results, other folder


def test_reference_blocks_cover_every_descriptor(demo_stores) -> None:
    _, _, refs, _ = demo_stores
    store = ShardStore(refs)
    blocks = list(reference_blocks(store, range(len(store.shards))))
    total = sum(len(d) for d, _ in blocks)
    expected = sum(len(store.load(k)["views"]["orig"]["desc"]["data"])
                   for k in range(len(store.shards)))
    assert total == expected
    images = np.unique(np.concatenate([decode_images(i) for _, i in blocks]))
    assert [store.id_of(n) for n in images] == store.ids


def test_an_index_without_its_nprobe_stops_a_run_before_any_work(tmp_path: Path) -> None:
    conf = load_config(overrides=["local_search.index=IVF4096,SQ8"])  # nprobe: auto
    with pytest.raises(UserError, match="give a number for 'IVF4096,SQ8'"):
        pipeline.run(conf, DATA / "queryimages", DATA / "referenceimages", tmp_path / "work")
    assert not (tmp_path / "work" / "local_fea").exists()


def test_an_hnsw_quantiser_is_trained_by_two_level_kmeans(demo_stores, monkeypatch) -> None:
    """``train_index.train`` fills an HNSW coarse quantiser with one centroid per list from
    two-level k-means (no flat k-means over every list) and fits the codec: the trained index,
    filled with the descriptors, finds most descriptors' exact nearest neighbours, and every
    list's centroid lies among the descriptors (closer than the centroid of all of them)."""
    from local_fea import train_index
    from local_fea.index import set_nprobe

    calls = []
    two_level = train_index.two_level_clustering
    monkeypatch.setattr(train_index, "two_level_clustering",
                        lambda x, nc1, nc2, **kw: calls.append((nc1, nc2)) or two_level(
                            x, nc1, nc2, **kw))
    _, _, refs, _ = demo_stores
    x = train_index.sample_descriptors(ShardStore(refs), 20_000)
    index = train_index.train("IVF64_HNSW32,PQ32x4fs", x)
    assert calls == [(8, 64)]
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    assert index.is_trained and ivf.quantizer.ntotal == ivf.nlist == 64
    nearest, _ = faiss.knn(centroids, x, 1)
    assert np.median(nearest) < np.median(((x - x.mean(axis=0)) ** 2).sum(axis=1))
    index.add(x)
    set_nprobe(index, 8)
    queries = x[::50] + np.float32(2.0)  # near a descriptor, not on it
    _, truth = faiss.knn(queries, x, 1)
    _, found = index.search(queries, 10)
    assert np.mean([t in row for t, row in zip(truth[:, 0], found, strict=True)]) >= 0.9


def test_an_index_in_parts_finds_what_one_index_finds(demo_stores, tmp_path: Path) -> None:
    """With a small ``index_part_mb`` the populated index is a chain of parts, each within
    the budget, extended as the store grows; searched one part at a time (``PartedSearch``)
    it gives the neighbours of the index in one part, and leaves out removed references."""
    import json
    import shutil

    from local_fea.index import (
        IndexSearch,
        PartedSearch,
        ReferenceIndex,
        load_index,
        load_trained,
        trained_index_path,
        write_index,
    )
    from local_fea.train_index import sample_descriptors, train

    conf, _, refs, queries = demo_stores
    section = {**conf["local_search"], "index": "IVF64,PQ64x4fs", "nprobe": 8,
               "trained_dir": str(tmp_path / "trained")}  # few lists: little list padding
    features = refs.parent.name
    grown = ShardStore(refs)
    (tmp_path / "trained").mkdir()
    write_index(train(section["index"], sample_descriptors(grown, 20_000)),
                trained_index_path(section, features))
    early = tmp_path / refs.name  # the same store before its last shard was added
    shutil.copytree(refs, early)
    manifest = json.loads((early / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]
    (early / "manifest.json").write_text(json.dumps(manifest))

    sizes = [len(grown.load(k)["views"]["orig"]["desc"]["data"]) for k in range(3)]
    assert len(grown.shards) == 3 and sizes[0] > sizes[2]
    per_desc = load_trained(section, features).sa_code_size() + 8
    budget_mb = (sizes[1] + (sizes[0] + sizes[2]) / 2) * per_desc / 2**20  # 1 and 2 fit, not 0+1
    parted = ReferenceIndex(tmp_path / "parted", {**section, "index_part_mb": budget_mb},
                            features)
    first = parted.update(ShardStore(early))
    parts = parted.update(grown)
    assert len(first) == len(parts) == 2 and [p for _, _, p in parted.parts()] == parts
    assert first[0] == parts[0] and not first[1].exists()  # the last part was extended
    assert [p.name for p in parts] == ["index-1.faiss", "index-1-3.faiss"]
    (tmp_path / "parted" / "index-1-1.faiss").write_bytes(b"")  # a stray empty range
    (tmp_path / "parted" / "index-1-2.faiss").write_bytes(b"")  # what an update replaced
    assert [p for _, _, p in parted.parts()] == parts
    for part in parts:
        index = faiss.read_index(str(part))
        assert index.ntotal * (index.sa_code_size() + 8) <= budget_mb * 2**20
    (whole,) = ReferenceIndex(tmp_path / "whole", section, features).update(grown)

    _, _, desc = search.query_block(ShardStore(queries), 0)
    gone = encode_ids(3, 2000)  # every descriptor of reference image 3
    for exclude in (np.zeros(0, np.int64), gone):
        d_one, i_one = IndexSearch(load_index(whole, 8), 10, 8, exclude)(desc)
        d_parts, i_parts = PartedSearch(parts, load_trained(section, features), 10, 8,
                                        exclude)(desc)
        np.testing.assert_allclose(d_parts, d_one, rtol=1e-5)
        assert (i_parts == i_one).mean() > 0.99  # equal distances may swap places
        for found in (i_one, i_parts):  # image 3 is a neighbour unless it is left out
            assert (decode_images(found) == 3).any() == (len(exclude) == 0)


def test_the_search_stage_reads_an_index_in_parts(demo_stores, tmp_path: Path) -> None:
    """A small ``index_part_mb`` splits the stage's index into parts (three on the demo) and
    the stage finds the candidates of the one-part index."""
    conf, _, refs, queries = demo_stores
    section = {**conf["local_search"], "index": "IVF1024,PQ64x4fs", "nprobe": 8}
    runs = {}
    for name, part_mb in (("whole", 8192), ("parts", 0.2)):
        work = tmp_path / name
        runs[name] = search.main({**conf, "local_search": {**section, "index_part_mb": part_mb}},
                                 queries, refs, work)
        (folder,) = (work / "local_index").glob("*/*")
        assert len(list(folder.glob("index-*.faiss"))) == (1 if name == "whole" else 3)
    rows = {n: {(r["query_id"], r["view"], r["reference_id"])
                for r in csv.DictReader(p.read_text().splitlines())} for n, p in runs.items()}
    assert rows["whole"] == rows["parts"] and rows["whole"]
    # three query shards in one searcher call write what three calls wrote
    store, ref_store = ShardStore(queries), ShardStore(refs)
    (whole,) = (tmp_path / "whole" / "local_index").glob("*/*/index-*.faiss")
    searcher = search.open_searcher(section, ref_store, [whole])
    outs = [tmp_path / f"together_{k}.csv" for k in range(3)]
    search.search_shards([0, 1, 2], store, ref_store, searcher, section, outs)
    alone = sorted((runs["whole"].parent / "parts").glob("part_*.csv"))
    assert [p.read_bytes() for p in outs] == [p.read_bytes() for p in alone]


def test_an_index_in_parts_is_read_once_for_several_query_shards(demo_stores) -> None:
    """Each searcher call over an index in parts reads every part, so query shards are
    searched in groups holding up to a quarter of a part's bytes of descriptors; with one
    part, one shard per call."""
    _, _, _, queries = demo_stores
    store = ShardStore(queries)
    todo = list(range(len(store.shards)))
    assert len(todo) == 3
    sizes = [sum(int(v["desc"]["offsets"][-1]) for v in store.load(k)["views"].values())
             for k in todo]
    assert search.query_groups(store, todo, False, 10**6) == [[0], [1], [2]]
    assert search.query_groups(store, todo, True, 10**6) == [todo]
    two = (sizes[0] + sizes[1]) * 4 * 128 * 4 / 2**20  # the first two shards fill a group
    assert search.query_groups(store, todo, True, two) == [[0, 1], [2]]
    assert search.query_groups(store, [2, 0], True, 0.001) == [[2], [0]]
    assert search.query_groups(store, todo, True, 10**6, min_groups=3) == [[0], [1], [2]]
