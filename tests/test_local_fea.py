"""RootSIFT extraction: coordinates, mirror view, bad input, resumption after SIGKILL."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import shards
from common.shards import ShardStore
from local_fea import extract
from local_fea.features import ROOTSIFT_SCALE, LocalFeatures, extract_image, mirror_view
from match_score.geometry import ratio_matches
from tests.conftest import DATA, demo_references, kill_midway, python


def test_rootsift_is_unit_norm_uint8(conf) -> None:
    feats = extract_image(demo_references()[0], conf["local_fea"], mirror=False)
    kpts, desc = feats.views["orig"]
    assert desc.dtype == np.uint8 and desc.shape[1] == 128 and kpts.shape == (len(desc), 4)
    assert 100 < len(desc) <= conf["local_fea"]["max_keypoints"]
    norms = np.linalg.norm(desc / ROOTSIFT_SCALE, axis=1)
    assert np.allclose(norms, 1.0, atol=0.02)
    assert (desc == 255).mean() < 1e-4  # quantisation does not clip


def test_keypoints_are_in_full_resolution_coordinates(tmp_path: Path, conf) -> None:
    img = Image.open(demo_references()[1]).convert("RGB")
    assert min(img.size) > 300
    big = img.resize((img.width * 2, img.height * 2), Image.Resampling.LANCZOS)
    img.save(tmp_path / "small.png")
    big.save(tmp_path / "big.png")
    small_f = extract_image(tmp_path / "small.png", conf["local_fea"], False)
    big_f = extract_image(tmp_path / "big.png", conf["local_fea"], False)
    assert small_f.size == img.size and big_f.size == big.size
    (ks, ds), (kb, db) = small_f.views["orig"], big_f.views["orig"]
    qi, ri, _ = ratio_matches(ds, db, 1.8)
    assert len(qi) > 100
    error = np.linalg.norm((ks[qi, :2] + 0.5) * 2 - 0.5 - kb[ri, :2], axis=1)
    assert np.median(error) < 1.5


def test_mirror_view_describes_the_flipped_image(tmp_path: Path, conf) -> None:
    img = Image.open(demo_references()[2]).convert("RGB")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "flipped.png")
    img.save(tmp_path / "orig.png")
    section = conf["local_fea"]
    both = extract_image(tmp_path / "orig.png", section, mirror=True)
    same_budget = {**section, "max_keypoints": section["query_max_keypoints"]}
    flipped = extract_image(tmp_path / "flipped.png", same_budget, mirror=False)
    km, dm = both.views["mirror"]
    kf, df = flipped.views["orig"]
    qi, ri, _ = ratio_matches(dm, df, 1.8)
    assert len(qi) > 0.5 * len(dm)
    assert np.median(np.linalg.norm(km[qi, :2] - kf[ri, :2], axis=1)) < 1.0
    # the mirror view is derived, not described again: most keypoints are the very ones
    # SIFT finds in the flipped image, with the same descriptors
    turn = np.abs((km[:, None, 3] - kf[None, :, 3] + 180) % 360 - 180)  # degrees
    gap = np.linalg.norm(km[:, None, :3] - kf[None, :, :3], axis=2) + (turn > 1) * 1e3
    same, nearest = gap.min(axis=1) < 0.5, gap.argmin(axis=1)  # full-resolution pixels
    assert same.mean() > 0.8
    cos = (dm[same].astype(float) * df[nearest[same]]).sum(1) / ROOTSIFT_SCALE**2
    assert np.median(cos) > 0.999


def test_mirror_view_twice_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    kpts = np.c_[rng.uniform(0, 299, (50, 2)), rng.uniform(2, 20, 50),
                 np.r_[0.0, 180.00002, rng.uniform(0, 360, 48)]].astype(np.float32)
    desc = rng.integers(0, 256, (50, 128), dtype=np.uint8)
    km, dm = mirror_view(kpts, desc, 300)
    assert np.allclose(km[:, 0], 299.5 - kpts[:, 0]) and (km[:, 3] < 360).all()
    assert not np.array_equal(dm, desc)
    back, back_desc = mirror_view(km, dm, 300)
    assert np.allclose(back[:, :3], kpts[:, :3], atol=1e-4)
    assert np.allclose(np.cos(np.radians(back[:, 3] - kpts[:, 3])), 1, atol=1e-6)
    assert np.array_equal(back_desc, desc)
    empty = mirror_view(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8), 300)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 128)


def test_bad_inputs_are_skipped_and_reported(tmp_path: Path, photos: Path, conf) -> None:
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    Image.new("L", (400, 300), 128).save(photos / "flat.png")
    work = tmp_path / "work"
    root = extract.main(conf, photos, work)
    feats = LocalFeatures(root)
    assert len(feats.store) == 9
    assert feats.status("zero").startswith("empty file")
    assert feats.status("text").startswith("not an image")
    assert feats.status("flat") == "" and len(feats.get("flat")[0]) == 0
    with open(root / "skipped.csv") as f:
        assert {r["id"] for r in csv.DictReader(f)} == {"zero", "text", "flat"}
    with open(next((work / "runs").glob("*extract*")) / "skipped.csv") as f:
        reasons = {r["item"]: r["reason"] for r in csv.DictReader(f)}
    assert set(reasons) == {"zero", "text", "flat"} and "no keypoints" in reasons["flat"]
    good = next(i for i in feats.store.ids if i not in reasons)
    assert len(feats.get(good)[1]) > 100 and feats.thumb(good).ndim == 2


def test_store_reads_back_each_image_as_extracted(tmp_path: Path, photos: Path, conf) -> None:
    root = extract.main(conf, photos, tmp_path / "work", mirror=True)
    feats = LocalFeatures(root)
    for path in sorted(photos.iterdir())[4:6]:  # the second shard
        direct = extract_image(path, conf["local_fea"], mirror=True)
        for view in ("orig", "mirror"):
            stored = feats.image(path.stem, view)
            assert stored.size == direct.size == feats.size(path.stem)
            assert np.array_equal(stored.thumb, direct.thumb)
            for got, want, old in zip(stored.views[view], direct.views[view],
                                      feats.get(path.stem, view), strict=True):
                assert np.array_equal(got, want) and np.array_equal(got, old)
                assert type(got) is np.ndarray  # a plain view of the mapped pages
    kept = feats.image(path.stem, "mirror")
    shards._load_shard.cache_clear()  # the cache lets go of the shard: its views still read
    assert np.array_equal(kept.views["mirror"][1], direct.views["mirror"][1])


def _extract_cmd(images: Path, work: Path) -> list[str]:
    return [python(), "-m", "local_fea.extract", "--images", str(images), "--work", str(work),
            "-o", "run.shard_size=2", "--n-jobs", "1"]


@pytest.mark.slow
def test_sigkill_midway_then_restart_gives_identical_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(DATA / "referenceimages", images)
    shutil.copytree(DATA / "queryimages", images, dirs_exist_ok=True)
    n_shards = len(list(images.iterdir())) // 2
    subprocess.run(_extract_cmd(images, tmp_path / "clean"), check=True, capture_output=True)

    killed = tmp_path / "killed"
    kill_midway(_extract_cmd(images, killed), killed, "shard_*.pkl", 3, n_shards)
    subprocess.run(_extract_cmd(images, killed), check=True, capture_output=True)

    clean_root = next((tmp_path / "clean").rglob("manifest.json")).parent
    killed_root = next(killed.rglob("manifest.json")).parent
    assert ShardStore(killed_root).missing() == []
    clean_files = sorted(p.name for p in clean_root.iterdir())
    assert clean_files == sorted(p.name for p in killed_root.iterdir())  # no stray tmp files
    for name in clean_files:
        if name.startswith("shard_"):
            assert (clean_root / name).read_bytes() == (killed_root / name).read_bytes(), name


def test_a_set_described_as_references_is_never_reused_as_queries(photos: Path,
                                                                   tmp_path: Path, conf) -> None:
    """The same folder extracted as references, then as queries, gets a store of its own with
    the mirror view and the query keypoint budget (the references' store was reused)."""
    conf["local_fea"].update(max_keypoints=50, query_max_keypoints=400)
    work = tmp_path / "work"
    as_refs = extract.main(conf, photos, work)
    as_queries = extract.main(conf, photos, work, mirror=True)
    assert as_queries != as_refs
    refs, queries = LocalFeatures(as_refs), LocalFeatures(as_queries)
    assert refs.views() == ["orig"] and queries.views() == ["orig", "mirror"]
    image = refs.store.ids[0]
    assert len(refs.get(image)[0]) <= 50 < len(queries.get(image)[0])


def test_query_budget_does_not_touch_the_reference_store(photos: Path, tmp_path: Path,
                                                         conf) -> None:
    work = tmp_path / "work"
    refs = extract.main(conf, photos, work)
    shard = ShardStore(refs).shard_path(0)
    stamp = shard.stat().st_mtime_ns
    conf["local_fea"]["query_max_keypoints"] = 500
    assert extract.main(conf, photos, work) == refs and shard.stat().st_mtime_ns == stamp
    assert "k500" in extract.main(conf, photos, work, mirror=True).name


def test_two_folders_with_one_name_get_their_own_stores(tmp_path: Path, conf) -> None:
    first, second = tmp_path / "a" / "images", tmp_path / "b" / "images"
    for folder, photos in ((first, demo_references()[:3]), (second, demo_references()[3:5])):
        folder.mkdir(parents=True)
        for path in photos:
            shutil.copy(path, folder / path.name)
    work = tmp_path / "work"
    stores = [extract.main(conf, folder, work) for folder in (first, second)]
    assert stores[0] != stores[1] and all(s.name.startswith("images-") for s in stores)
    assert [len(ShardStore(s)) for s in stores] == [3, 2]
    assert extract.main(conf, first, work) == stores[0]  # found again, not confused
