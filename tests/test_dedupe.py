"""``copydet dedupe`` end to end on real small photos: edited copies grouped, look-alike
garments not, each image described once, each unordered pair once, bad input skipped."""

from __future__ import annotations

import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from common.io import read_csv
from data.edits import apply_edit
from pipeline.dedupe import dedupe
from tests.conftest import DATA, SHARED, demo_references, kill_midway, python
from tests.test_report import _browser, _headless, console_messages

GARMENTS = ("M00645", "M00484")  # two garments on one grey backdrop (more_photos_groups GM04)
COPIES = ("copy_crop.jpg", "copy_flip.jpg", "copy_colour.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three edited copies of one photo, four unrelated photos, ``a.jpg`` and ``a.png``
    byte-identical, a broken file, and two garments on one backdrop where available."""
    root = tmp_path_factory.mktemp("dedupe") / "photos"
    (root / "sub").mkdir(parents=True)
    refs = demo_references()
    photo = Image.open(refs[0]).convert("RGB")
    rng = np.random.default_rng(0)
    for name, kinds in zip(COPIES, (["crop"], ["hflip"], ["color", "jpeg"]), strict=True):
        edited = photo
        for kind in kinds:
            edited = apply_edit(kind, edited, rng).image
        edited.save(root / name)
    for k, ref in enumerate(refs[5:9]):
        shutil.copy(ref, root / ("sub" if k == 0 else ".") / f"other{k}.jpg")
    shutil.copy(refs[10], root / "a.jpg")
    shutil.copy(refs[10], root / "a.png")  # one stem, two files: two images, byte-identical
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    more = SHARED / "trainset" / "more_photos"
    for stem in GARMENTS:
        if (more / f"{stem}.jpg").exists():
            shutil.copy(more / f"{stem}.jpg", root / f"{stem}.jpg")
    return root


@pytest.fixture(scope="module")
def result(folder: Path) -> tuple[Path, Path]:
    conf = load_config(overrides=["run.shard_size=4", "run.n_jobs=2"])
    work = folder.parent / "work"
    return dedupe(conf, folder, work), work


def groups_of(out: Path) -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {}
    for row in read_csv(out / "groups.csv"):
        found.setdefault(row["group"], []).append((row["image"], int(row["keep"])))
    return found


def test_three_edited_copies_are_one_group_with_one_image_kept(result) -> None:
    out, _ = result
    groups = [g for g in groups_of(out).values() if {i for i, _ in g} & set(COPIES)]
    assert len(groups) == 1 and {i for i, _ in groups[0]} == set(COPIES)
    assert sum(k for _, k in groups[0]) == 1
    kept = next(i for i, k in groups[0] if k)
    removed = set((out / "remove.txt").read_text().split())
    assert removed >= set(COPIES) - {kept} and kept in (out / "keep.txt").read_text().split()


def test_byte_identical_files_are_one_group_and_ids_are_file_names(result) -> None:
    out, _ = result
    assert [sorted(i for i, _ in g) for g in groups_of(out).values()
            if "a.jpg" in dict(g)] == [["a.jpg", "a.png"]]
    assert "sub/other0.jpg" in (out / "keep.txt").read_text().split()


def test_two_garments_on_one_backdrop_are_not_grouped(result, folder: Path) -> None:
    if not all((folder / f"{s}.jpg").exists() for s in GARMENTS):
        pytest.skip(f"the garment photos are not in {SHARED}")
    out, _ = result
    grouped = {i for g in groups_of(out).values() for i, _ in g}
    assert not grouped & {f"{s}.jpg" for s in GARMENTS}


def test_each_image_is_described_once(result, folder: Path) -> None:
    _, work = result
    stores = [p for p in (work / "local_fea").glob("*/*") if (p / "manifest.json").exists()
              and "crop" not in p.name]  # the overlay crops are other pictures
    assert len(stores) == 1
    descriptors = list((work / "global_fea").rglob("descriptors.h5"))
    assert len(descriptors) == 1
    with h5py.File(descriptors[0], "r") as f:
        assert isinstance(f.get("reference", getlink=True), h5py.SoftLink)
        assert len(f["query_ids"]) == len(f["reference_ids"]) == 9 + len(
            list(folder.glob("M0*.jpg")))  # every readable image, once


def test_each_unordered_pair_is_listed_once(result) -> None:
    out, _ = result
    rows = read_csv(out / "pairs.csv")
    pairs = [(r["image_a"], r["image_b"]) for r in rows]
    assert pairs and all(a < b for a, b in pairs) and len(set(pairs)) == len(pairs)
    assert {tuple(sorted(p)) for p in combinations(COPIES, 2)} <= set(pairs)


def test_the_broken_file_is_skipped_with_one_line(result) -> None:
    _, work = result
    skipped = [r for f in (work / "local_fea").rglob("skipped.csv") for r in read_csv(f)]
    assert [r for r in skipped if "broken.jpg" in str(r.values())]


def test_the_page_shows_the_groups(result) -> None:
    out, _ = result
    page = (out / "report" / "index.html").read_text()
    assert "copy_crop.jpg" in page and 'id="filter"' in page
    assert len(list((out / "report" / "thumbs").glob("*.jpg"))) >= 5


def test_one_image_gives_empty_outputs_and_exit_0(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    shutil.copy(demo_references()[0], tmp_path / "one" / "only.jpg")
    done = subprocess.run([python(), "-m", "copydet", "dedupe", "--images",
                           str(tmp_path / "one"), "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out"), "-o", "run.n_jobs=1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_csv(tmp_path / "out" / "pairs.csv") == []
    assert read_csv(tmp_path / "out" / "groups.csv") == []
    assert (tmp_path / "out" / "remove.txt").read_text() == ""
    assert (tmp_path / "out" / "keep.txt").read_text() == "only.jpg\n"


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None,
                    reason="chromium is not installed (apt-get install chromium): no browser test")
def test_the_groups_page_in_a_headless_browser(result, tmp_path: Path) -> None:
    out, _ = result
    page = (out / "report" / "index.html").as_uri()
    browser = _browser()
    assert browser is not None
    shot = tmp_path / "shot.png"
    done = _headless(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), np.float64)
    assert grey.shape == (1600, 1200) and grey.std() > 20  # not blank
    dom = _headless(browser, tmp_path, "--dump-dom", page).stdout
    n_groups = len(groups_of(out))
    assert dom.count('class="group"') == n_groups and f"({n_groups} groups)" in dom
    assert dom.count('class="member keep"') == n_groups  # one kept image marked per group
    dom = _headless(browser, tmp_path, "--dump-dom", f"{page}?q=copy_crop").stdout
    drawn = dom.split('id="group-list"')[1].split("</section>")[0]  # not the data
    assert drawn.count('class="group"') == 1 and "copy_flip.jpg" in drawn
    assert "a.png" not in drawn


@pytest.mark.slow
def test_a_killed_dedupe_resumes_to_the_outputs_of_an_uninterrupted_one(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(DATA / "referenceimages", images)
    for path in (DATA / "queryimages").glob("*.jpg"):
        shutil.copy(path, images / path.name)
    n_shards = -(-len(list(images.iterdir())) // 8)

    def cmd(work: Path) -> list[str]:
        return [python(), "-m", "copydet", "dedupe", "--images", str(images), "--work",
                str(work), "--out", str(work / "out"), "-o", "run.shard_size=8"]

    kill_midway(cmd(tmp_path / "killed"), tmp_path / "killed" / "local_fea", "shard_*.pkl",
                2, n_shards)
    assert not (tmp_path / "killed" / "out" / "pairs.csv").exists()
    for work in ("killed", "whole"):
        subprocess.run(cmd(tmp_path / work), check=True, capture_output=True)
    for name in ("pairs.csv", "groups.csv", "remove.txt"):
        assert ((tmp_path / "killed" / "out" / name).read_text()
                == (tmp_path / "whole" / "out" / name).read_text()), name
    assert (tmp_path / "whole" / "out" / "remove.txt").read_text()  # the demo's copies
