"""``data.make_benchmark`` on a small folder of real photos."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common.io import read_csv
from data.make_benchmark import assign_roles, main, make_benchmark
from data.photos import readable_photos

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = (ROOT / "data" / "referenceimages", ROOT.parent / "shared" / "cc0_photos")
N_REFS, N_POS, N_DIS = 6, 5, 3


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Ten real photos (downscaled to keep the tests fast) plus a corrupt one and a text file."""
    found = next((sorted(d.glob("*.jpg")) for d in PHOTO_DIRS if len(list(d.glob("*.jpg"))) > 9),
                 None)
    if found is None:
        pytest.skip("no test photos (data/referenceimages or ../shared/cc0_photos)")
    folder = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(found[:10]):
        with Image.open(path) as im:
            im.convert("RGB").resize((im.width // 2, im.height // 2)).save(folder / f"p{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a photo")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def _build(source: Path, out: Path, seed: int = 0, **kwargs) -> Path:
    return make_benchmark(source, out, N_REFS, N_POS, N_DIS, seed, max_side=180, **kwargs)


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_layout_counts_and_consistency(source, tmp_path):
    out = _build(source, tmp_path / "bench")
    refs = sorted(p.name for p in (out / "referenceimages").iterdir())
    queries = sorted(p.name for p in (out / "queryimages").iterdir())
    assert refs == [f"R{i:06d}.jpg" for i in range(N_REFS)]
    assert queries == [f"Q{i:05d}.jpg" for i in range(N_POS + N_DIS)]
    for name in refs:
        with Image.open(out / "referenceimages" / name) as im:
            assert im.format == "JPEG" and max(im.size) <= 180
    gt, edits = read_csv(out / "gt.csv"), read_csv(out / "edits.csv")
    assert [r["query_id"] for r in gt] == [q[:-4] for q in queries]
    assert [r["query_id"] for r in edits] == [q[:-4] for q in queries]
    assert all(r["edits"] and r["edits"].strip("+") == r["edits"] for r in edits)
    positives = [r["query_id"] for r in gt if r["reference_id"]]
    assert len(positives) == N_POS
    assert {r["reference_id"] for r in gt if r["reference_id"]} <= {n[:-4] for n in refs}
    transforms = json.loads((out / "transforms.json").read_text())
    assert sorted(transforms) == positives
    assert all(np.asarray(t).shape == (3, 3) for t in transforms.values())


def test_roles_are_disjoint_and_seeded(source):
    photos = readable_photos(source)
    assert len(photos) == 10 and all(p.name != "broken.jpg" for p in photos)
    roles = assign_roles(photos, N_REFS, N_DIS, seed=3)
    groups = [set(roles.references), set(roles.distractor_sources), set(roles.backgrounds)]
    assert [len(g) for g in groups] == [N_REFS, N_DIS, 10 - N_REFS - N_DIS]
    assert set.union(*groups) == set(photos) and sum(map(len, groups)) == len(photos)
    assert assign_roles(photos, N_REFS, N_DIS, seed=3) == roles
    assert assign_roles(photos, N_REFS, N_DIS, seed=4) != roles
    with pytest.raises(ValueError):
        assign_roles(photos, 8, 3, seed=0)


def test_positives_copy_their_reference_and_distractors_no_reference(source, tmp_path):
    out = _build(source, tmp_path / "bench", kinds=("hflip",), n_edits=(1, 1))
    refs = {p.stem: _load(p) for p in sorted((out / "referenceimages").iterdir())}
    for row in read_csv(out / "gt.csv"):
        query = _load(out / "queryimages" / f"{row['query_id']}.jpg")[:, ::-1]
        dist = {rid: np.abs(ref - query).mean() for rid, ref in refs.items()
                if ref.shape == query.shape}
        if row["reference_id"]:
            assert min(dist, key=dist.get) == row["reference_id"]
            assert dist[row["reference_id"]] < 4
        else:
            assert all(d > 15 for d in dist.values())
    rows = read_csv(out / "edits.csv")
    assert {r["edits"] for r in rows} == {"hflip"}


def test_transforms_map_reference_pixels_onto_the_query(source, tmp_path):
    # No crop: after a crop and an expanding edit, part of the mapped frame is fill, not content.
    kinds = ("rotate", "scale", "pad", "aspect", "perspective", "onto_bg")
    out = _build(source, tmp_path / "bench", seed=5, kinds=kinds)
    transforms = json.loads((out / "transforms.json").read_text())
    for row in read_csv(out / "gt.csv"):
        if not row["reference_id"]:
            continue
        ref = _load(out / "referenceimages" / f"{row['reference_id']}.jpg")
        query = _load(out / "queryimages" / f"{row['query_id']}.jpg")
        size = (query.shape[1], query.shape[0])
        matrix = np.asarray(transforms[row["query_id"]])
        warped = cv2.warpPerspective(ref, matrix, size, flags=cv2.INTER_LINEAR)
        mask = cv2.warpPerspective(np.ones(ref.shape[:2], np.uint8), matrix, size,
                                   flags=cv2.INTER_NEAREST)
        mask = cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
        assert mask.sum() > 500
        good = np.abs(warped - query)[mask].mean()
        shifted = cv2.warpPerspective(ref, np.array([[1, 0, 3], [0, 1, 0], [0, 0, 1]]) @ matrix,
                                      size, flags=cv2.INTER_LINEAR)
        assert good < 10 and good < 0.5 * np.abs(shifted - query)[mask].mean(), row


def test_same_seed_gives_the_same_bytes(source, tmp_path):
    a, b = _build(source, tmp_path / "a"), _build(source, tmp_path / "b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = _build(source, tmp_path / "c", seed=1)
    assert (c / "edits.csv").read_bytes() != (a / "edits.csv").read_bytes()


def test_refuses_to_overwrite_without_force(source, tmp_path, capsys):
    out = _build(source, tmp_path / "bench")
    with pytest.raises(FileExistsError):
        _build(source, out)
    args = ["--photos", str(source), "--out", str(out), "--refs", "4", "--positives", "2",
            "--distractors", "2", "--max-side", "120"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "--force" in capsys.readouterr().err.strip().splitlines()[-1]  # one line
    assert len(list((out / "referenceimages").iterdir())) == N_REFS  # untouched
    assert main([*args, "--force"]) == 0
    assert len(list((out / "referenceimages").iterdir())) == 4
    assert len(list((out / "queryimages").iterdir())) == 4


def test_unrelated_files_in_out_are_not_a_benchmark(source, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "README.md").write_text("hello\n")
    _build(source, out)
    assert (out / "README.md").read_text() == "hello\n" and (out / "gt.csv").is_file()


def test_corrupt_photo_is_skipped_with_one_log_line(source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _build(source, tmp_path / "bench")
    lines = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(lines) == 1 and "skipped" in lines[0]


def test_too_few_photos_is_an_error(source, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for path in sorted(source.glob("p0[0-2].jpg")):
        shutil.copy(path, small / path.name)
    with pytest.raises(ValueError):
        make_benchmark(small, tmp_path / "bench", 3, 2, 1, seed=0)


def test_timing_set_grows_the_photos_into_a_larger_benchmark(source, tmp_path):
    from data import make_timing_set

    out = tmp_path / "timing"
    assert make_timing_set.main(["--photos", str(source), "--out", str(out), "--refs", "14",
                                 "--positives", "4", "--distractors", "4",
                                 "--backgrounds", "2"]) == 0
    (folder,) = out.glob("pool-*")
    pool = sorted(folder.glob("*.jpg"))
    assert len(pool) == 20  # 10 readable photos, then 10 edited variants of them
    originals = sorted(source.glob("p*.jpg"))
    assert np.array_equal(_load(pool[0]).shape, _load(originals[0]).shape)
    assert _load(pool[10]).shape != _load(pool[0]).shape or \
        np.abs(_load(pool[10]) - _load(pool[0])).mean() > 2  # a variant, not a copy
    gt = read_csv(out / "gt.csv")
    assert len(list((out / "referenceimages").glob("*.jpg"))) == 14
    assert len(gt) == 8 and sum(bool(r["reference_id"]) for r in gt) == 4
    before = {p.name: p.stat().st_mtime_ns for p in pool}
    assert make_timing_set.main(["--photos", str(source), "--out", str(out), "--refs", "14",
                                 "--positives", "4", "--distractors", "4",
                                 "--backgrounds", "2", "--force"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")} == before
    assert make_timing_set.main(["--photos", str(source), "--out", str(out), "--refs", "14",
                                 "--positives", "4", "--distractors", "4",
                                 "--backgrounds", "2", "--force", "--seed", "1"]) == 0
    assert len(list(out.glob("pool-*"))) == 2  # another seed: another pool
