"""Overlay detector: synthetic labels, box selection, detection and crops, crop-local branch,
and ultralytics kept offline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from common import UserError
from common.images import list_images
from common.io import read_csv
from data.edits import map_points, random_chain
from merge import fuse
from merge.branches import selected
from merge.evidence import LOGIT_FLOOR
from merge.features import gather
from preprocess import detect, synth
from preprocess.detect import Box, select_box, used_for
from preprocess.evaluate import iou
from preprocess.yolo import load_model
from tests.conftest import DATA, demo_references, offline_env, python

MAGENTA = (255, 0, 255)


def _magenta_box(img: Image.Image) -> tuple[float, float, float, float]:
    """Box (pixel edges) of the rows and columns that are mostly the magenta copy."""
    arr = np.asarray(img.convert("RGB")).astype(int)
    mask = (np.abs(arr - MAGENTA) < 60).all(axis=2)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.3 * mask.mean(axis=0).max())
    rows = np.flatnonzero(mask.mean(axis=1) > 0.3 * mask.mean(axis=1).max())
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


@pytest.mark.parametrize("kind", ["paste", "pad", "screenshot", "meme"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_label_is_the_box_of_the_pasted_copy(kind: str, seed: int) -> None:
    copy = Image.new("RGB", (300, 200), MAGENTA)
    rng = np.random.default_rng(seed)
    placed = synth.place(kind, copy, rng, demo_references()[:4])
    post = random_chain(placed.image, rng, (), (1, 2), ("scale", "aspect"), 640)
    box = synth.copy_box(post.transform @ placed.transform, copy.size, post.image.size)
    assert box is not None
    drawn = _magenta_box(post.image)
    assert np.abs(np.subtract(box, drawn)).max() <= 2.0, (box, drawn)
    assert iou(Box(*box, 1), Box(*drawn, 1)) > 0.9
    w, h = post.image.size
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_label_of_a_copy_partly_outside_is_clipped() -> None:
    transform = np.array([[1.0, 0, -50], [0, 1.0, 30], [0, 0, 1]])  # shifted 50 px off the left
    assert synth.copy_box(transform, (100, 80), (400, 300)) == (0.0, 30.0, 50.0, 110.0)
    assert synth.copy_box(transform, (40, 80), (400, 300)) is None
    label = synth.yolo_label((0.0, 30.0, 50.0, 110.0), (400, 300)).split()
    assert label[0] == "0" and np.allclose([float(v) for v in label[1:]],
                                           [25 / 400, 70 / 300, 50 / 400, 80 / 300])


def test_synthetic_set_is_deterministic_resumable_and_yolo_shaped(tmp_path: Path) -> None:
    sizes = {"train": 10, "val": 3, "test": 4}
    a = synth.make_dataset(DATA / "referenceimages", tmp_path / "a", sizes, seed=3, n_jobs=1)
    b_root = tmp_path / "b"
    synth.make_dataset(DATA / "referenceimages", b_root, sizes, seed=3, n_jobs=1)
    (b_root / "parts" / "train_000000-000010.csv").unlink()  # a chunk that never finished
    (b_root / "images" / "train" / "train_000004.jpg").unlink()
    synth.make_dataset(DATA / "referenceimages", b_root, sizes, seed=3, n_jobs=1)
    a_root = a.parent
    for split, n in sizes.items():
        names = sorted(p.name for p in (a_root / "images" / split).iterdir())
        assert len(names) == n
        for name in names:
            assert (a_root / "images" / split / name).read_bytes() == \
                (b_root / "images" / split / name).read_bytes()
    rows = read_csv(a_root / "samples.csv")
    assert len(rows) == sum(sizes.values())
    for r in rows:
        label = (a_root / "labels" / r["split"] / f"{r['name']}.txt").read_text().split()
        assert bool(label) == bool(r["x1"]) == (r["kind"] != "negative")
        if label:
            with Image.open(a_root / "images" / r["split"] / f"{r['name']}.jpg") as im:
                w, h = im.size
            xc, yc, bw, bh = map(float, label[1:])
            assert np.isclose(xc * w, (float(r["x1"]) + float(r["x2"])) / 2, atol=0.1)
            assert np.isclose(yc * h, (float(r["y1"]) + float(r["y2"])) / 2, atol=0.1)
            assert 0 < bw <= 1 and 0 < bh <= 1
    data = (a_root / "data.yaml").read_text()
    assert "images/train" in data and "copy" in data


def test_a_synthetic_set_made_otherwise_is_made_again_and_never_keeps_extra_samples(
        tmp_path: Path) -> None:
    sizes, out = {"train": 4, "val": 1, "test": 1}, tmp_path / "set"
    first = out / "images" / "train" / "train_000000.jpg"
    synth.make_dataset(DATA / "referenceimages", out, sizes, seed=3, n_jobs=1)
    seed_3 = first.read_bytes()
    synth.make_dataset(DATA / "referenceimages", out, sizes, seed=4, n_jobs=1)
    assert first.read_bytes() != seed_3  # not the seed-3 chunk resumed
    synth.make_dataset(DATA / "referenceimages", out, {**sizes, "train": 2}, seed=4, n_jobs=1)
    assert sorted(p.stem for p in (out / "images" / "train").iterdir()) == \
        ["train_000000", "train_000001"]
    assert len(list((out / "labels" / "train").iterdir())) == 2
    assert len(read_csv(out / "samples.csv")) == 4
    photos = synth.split_photos(sorted((DATA / "referenceimages").glob("*.jpg")), 3)
    assert not set(photos["train"]) & set(photos["test"])


def test_box_selection_honours_thresholds(conf) -> None:
    pconf = conf["preprocess"]
    size = (1000, 800)
    whole = Box(0, 0, 1000, 800, 0.99)  # the whole image: not a crop
    thin = Box(100, 100, 900, 150, 0.95)  # aspect 16
    tiny = Box(10, 10, 30, 30, 0.9)  # under min_side
    good = Box(200, 200, 600, 500, 0.7)
    weaker = Box(300, 300, 500, 500, 0.6)
    assert select_box([whole, thin, tiny, weaker, good], size, pconf) == good
    assert select_box([whole, thin, tiny], size, pconf) is None
    assert used_for(good, pconf) == ["global", "local"]
    assert used_for(Box(0, 0, 500, 500, 0.52), pconf) == ["local"]
    assert used_for(Box(0, 0, 500, 500, pconf["conf_local"]), pconf) == []  # strictly above
    assert used_for(None, pconf) == []
    big = Box(0, 0, 1000, 800 * 0.86, 0.9)
    assert select_box([big], size, pconf) is None
    assert select_box([big], size, {**pconf, "max_area": 0.9}) == big


def _crafted_queries(folder: Path) -> tuple[float, float, float, float]:
    """A demo photo pasted onto another (returns its box) and an untouched photo."""
    folder.mkdir()
    refs = demo_references()
    with Image.open(refs[5]) as bg, Image.open(refs[8]) as fg:
        bg, fg = bg.convert("RGB"), fg.convert("RGB")
        small = fg.resize((round(bg.width * 0.45), round(bg.width * 0.45 * fg.height / fg.width)))
        x0, y0 = round(bg.width * 0.1), round(bg.height * 0.3)
        bg.paste(small, (x0, y0))
        bg.save(folder / "pasted.jpg", quality=92)
    shutil.copy(refs[12], folder / "plain.jpg")
    return x0, y0, x0 + small.width, y0 + small.height


def _rows(boxes: Path) -> dict[str, dict[str, str]]:
    return {r["query_id"]: r for r in read_csv(boxes)}


def test_detection_finds_a_pasted_copy_and_keeps_plain_queries_whole(tmp_path: Path,
                                                                      conf) -> None:
    truth = _crafted_queries(tmp_path / "queries")
    boxes = detect.main(conf, tmp_path / "queries", tmp_path / "work")
    rows = _rows(boxes)
    pasted = rows["pasted"]
    assert pasted["used_for"] == "global+local"
    found = Box(*(float(pasted[k]) for k in ("x1", "y1", "x2", "y2")), 1)
    assert iou(found, Box(*truth, 1)) > 0.7, (found, truth)
    root = boxes.parent
    for branch in ("global", "local"):
        folder = detect.crop_folder(root, branch)
        with Image.open(folder / "pasted.jpg") as crop:
            assert abs(crop.width - found.width) <= 2 and abs(crop.height - found.height) <= 2
        assert not (folder / "plain.jpg").exists()  # no paste: the branch takes the query
    assert rows["plain"]["used_for"] == ""  # a weak box may be recorded, but is not used


def test_cpu_detection_runs_a_replica_per_thread_and_gives_torch_its_threads_back(
        tmp_path: Path, conf) -> None:
    import torch

    before = torch.get_num_threads()
    _crafted_queries(tmp_path / "queries")
    (tmp_path / "queries" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    boxes = detect.main(conf, tmp_path / "queries", tmp_path / "work")  # run.n_jobs=2
    assert torch.get_num_threads() == before
    assert set(_rows(boxes)) == {"pasted", "plain"}
    assert [r["id"] for r in read_csv(boxes.parent / "skipped.csv")] == ["broken"]
    try:
        detector = detect.Detector(conf["preprocess"], 2, tmp_path / "yolo")
        assert detector.devices == ["cpu", "cpu"] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


ONTO_BG = ("Q00004", "Q00033")  # the demo's copies pasted onto another photo (R000004, R000025)


def test_demo_overlays_are_found_where_the_copy_was_pasted(tmp_path: Path, conf) -> None:
    transforms = json.loads((DATA / "transforms.json").read_text())
    boxes = detect.main(conf, DATA / "queryimages", tmp_path / "work")
    rows = _rows(boxes)
    hits, used = 0, 0
    for qid in ONTO_BG:
        ref = next(p for p in demo_references() if p.stem == csv_ref(qid))
        with Image.open(ref) as im:
            w, h = im.size
        corners = map_points(np.array(transforms[qid]), [(-0.5, -0.5), (w - 0.5, h - 0.5)]) + 0.5
        truth = Box(*corners.min(0), *corners.max(0), 1)
        r = rows[qid]
        hits += iou(Box(*(float(r[k]) for k in ("x1", "y1", "x2", "y2")), 1), truth) > 0.5
        used += "local" in r["used_for"]
    assert hits == 2  # the best box is on the pasted copy for both
    assert used >= 1  # and confident enough for a crop on at least one (recall is ~0.65)


def csv_ref(qid: str) -> str:
    return {r["query_id"]: r["reference_id"] for r in read_csv(DATA / "gt.csv")}[qid]


def test_thresholds_of_one_keep_every_query_whole_and_empty_crop_branch(tmp_path: Path,
                                                                         conf) -> None:
    _crafted_queries(tmp_path / "queries")
    (tmp_path / "queries" / "broken.jpg").write_bytes(b"not a jpeg")
    conf["preprocess"].update(conf_global=1.0, conf_local=1.0)
    boxes = detect.main(conf, tmp_path / "queries", tmp_path / "work")
    rows = _rows(boxes)
    assert set(rows) == {"pasted", "plain"}  # the broken file is skipped, and reported
    assert "broken" in (boxes.parent / "skipped.csv").read_text()
    assert all(r["used_for"] == "" for r in rows.values())
    assert rows["pasted"]["x1"] != ""  # the box is still recorded, with its confidence
    for branch in ("global", "local"):  # no crop at all
        assert not list(detect.crop_folder(boxes.parent, branch).iterdir())
    assert detect.crop_set(boxes, "local").ids == ()


@pytest.mark.slow
def test_crop_local_branch_scores_crops_under_original_ids_and_merge_fuses_it(
        tmp_path: Path, conf) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    for qid in (*ONTO_BG, "Q00013", "Q00001", "Q00010"):
        shutil.copy(DATA / "queryimages" / f"{qid}.jpg", queries)
    work = tmp_path / "work"
    query_set, ref_set = list_images(queries), list_images(DATA / "referenceimages")
    local = pipeline.run_local(conf, query_set, ref_set, work, pipeline.Record())
    conf["merge"].update(method="max", branches=["local", "crop_local"])
    branches = selected(conf["merge"]["branches"])
    with pytest.raises(UserError, match="no pairs of the crop_local branch"):
        fuse.main(conf, branches, {"local": local["pairs"]}, work)  # the detector has not run

    crop = pipeline.run_crop_local(conf, query_set, ref_set, work, pipeline.Record())
    pairs = crop["pairs"]
    assert crop["reference_store"] == local["reference_store"]  # one store per reference set
    cropped = set(detect.crop_set(crop["boxes"], "local").ids)
    found = cropped & set(ONTO_BG)
    assert found and "Q00013" in cropped  # Q00013: a paste whose source is no reference
    rows = read_csv(pairs)
    assert {r["query_id"] for r in rows} <= cropped
    best = {}
    for r in rows:
        best[r["query_id"]] = max(best.get(r["query_id"], (0, "")), (float(r["score"]),
                                                                       r["reference_id"]))
    assert all(best[qid][1] == csv_ref(qid) for qid in found)

    files = {"local": local["pairs"], "crop_local": pairs}
    sub = fuse.main(conf, branches, files, work, tmp_path / "sub.csv")
    fused = {(r["query_id"], r["reference_id"]): float(r["score"]) for r in read_csv(sub)}
    for r in rows:  # the best of both branches: the crops' evidence is in the submission
        assert fused[(r["query_id"], r["reference_id"])] >= float(r["score"]) - 1e-9

    table = gather(conf, branches, files, tmp_path / "fusion")
    crop_logit = dict(zip(table.pairs, table.x[:, table.features.index("crop_local_logit")],
                          strict=True))
    for qid in found:  # crop evidence for the true pair, even where only local found it
        assert crop_logit[(qid, csv_ref(qid))] > 0
    assert all(v == LOGIT_FLOOR for (q, _), v in crop_logit.items() if q not in cropped)


@pytest.mark.slow
def test_training_and_detection_run_with_the_network_blocked(tmp_path: Path) -> None:
    """Synthetic set, one epoch of training and detection with every socket refused; no
    library even tries to connect (``NO_NETWORK_LOG`` stays empty)."""
    env = {**offline_env(), "NO_NETWORK_LOG": str(tmp_path / "network.log")}
    env.pop("YOLO_CONFIG_DIR", None)
    env.pop("YOLO_OFFLINE", None)
    data = tmp_path / "synth"
    weights = tmp_path / "detector.safetensors"

    def run(*args: str) -> None:
        proc = subprocess.run([python(), "-m", *args], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("preprocess.synth", "--photos", str(DATA / "referenceimages"), "--out", str(data),
        "--train", "8", "--val", "4", "--test", "4", "--n-jobs", "1")
    run("preprocess.train", "--data", str(data), "--out", str(weights), "--work",
        str(tmp_path / "train"), "--epochs", "1", "--imgsz", "64", "--batch", "4")
    run("preprocess.train", "--data", str(data), "--out", str(tmp_path / "again.safetensors"),
        "--work", str(tmp_path / "train2"), "--epochs", "1", "--imgsz", "64", "--batch", "4",
        "--init", str(weights))  # training goes on from shipped weights
    run("preprocess.detect", "--images", str(DATA / "queryimages"), "--work",
        str(tmp_path / "work"), "-o", f"preprocess.weights={weights}", "-o",
        "preprocess.imgsz=64", "--n-jobs", "1")
    assert weights.stat().st_size < 5e6
    assert load_model(tmp_path / "again.safetensors").model.yaml["nc"] == 1
    assert json.loads(weights.with_suffix(".json").read_text())["test"]["samples"] == 4
    assert not (tmp_path / "network.log").exists()
    fonts = list(tmp_path.rglob("*.ttf"))
    assert fonts == []
    assert next((tmp_path / "work").rglob("boxes.csv")).read_text().count("\n") == 37


def test_detector_weights_must_be_an_exported_safetensors_file(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_model(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(UserError, match="carry no architecture"):
        load_model(tmp_path / "bare.safetensors")
