"""Trust nothing that is not ours (issue 14): no code runs from data files, the work folder
never links an input, one run per work folder, and what a user can fix is one line on stderr
with exit code 2 that keeps finished work."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import joblib
import numpy as np
import pytest
from PIL import Image

from common import UserError, safe_pickle
from common.cli import EXIT_BUG, EXIT_USER_ERROR, report_errors
from common.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from common.images import list_images
from common.io import clean_stale_tmp, dump_joblib, read_csv
from common.lock import work_lock
from common.schema import validate
from common.shards import ShardStore
from local_fea import extract
from local_fea.extract import store_path
from preprocess import detect
from tests.conftest import DATA, fill, offline_env, python, tmpfs

LOCAL_MAX = ("-o", "merge.branches=[local]", "-o", "merge.method=max")


class Payload:
    """Unpickling this creates ``marker``: what a planted pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


def plant(path: Path, marker: Path) -> Path:
    """A joblib shard at ``path`` whose loading would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump({"ids": ["x"], "status": [""], "payload": Payload(marker)}, path)
    return path


def command(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository, offline."""
    return subprocess.run([python(), "-m", *map(str, args)], cwd=REPO_ROOT, text=True,
                          capture_output=True, env=offline_env())


def one_line_error(done: subprocess.CompletedProcess, code: int = EXIT_USER_ERROR) -> str:
    """The single ``error:`` line of a run that stopped with exit code ``code`` (2: a user
    error) and no traceback."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    return errors[0]


def submission_scores(done: subprocess.CompletedProcess) -> dict[tuple[str, str], float]:
    """The pairs of the submission a ``copydet run`` printed, with their scores."""
    with open(done.stdout.strip().splitlines()[-1]) as f:
        return {(r["query_id"], r["reference_id"]): float(r["score"]) for r in csv.DictReader(f)}


def demo_folder(folder: Path, names: list[str]) -> Path:
    """A folder of some demo images (``Q…`` queries, ``R…`` references)."""
    folder.mkdir(parents=True)
    for name in names:
        source = "queryimages" if name.startswith("Q") else "referenceimages"
        shutil.copy(DATA / source / f"{name}.jpg", folder)
    return folder


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


# Security ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_image_folder_is_read_as_images_only(tmp_path: Path) -> None:
    """A made-up store (manifest + payload shard) in the reference folder is never loaded; the
    run (every branch) succeeds, and every shard it writes loads with the safe loader.
    (Passes since the restructure took ``store_for`` away; the last part needs the loader.)"""
    queries = demo_folder(tmp_path / "q", ["Q00016", "Q00031", "Q00003"])
    refs = demo_folder(tmp_path / "r", ["R000019", "R000011", "R000017", "R000000"])
    marker = tmp_path / "pwned"
    plant(refs / "shard_00000.pkl", marker)
    (refs / "manifest.json").write_text(json.dumps({
        "set": "r", "source": str(refs), "shard_size": 128, "shards": [["R000019"]],
        "paths": {"R000019": "R000019.jpg"}}))
    work = tmp_path / "work"
    done = command("copydet", "run", "--queries", queries, "--references", refs,
                   "--work", work, "-o", "run.n_jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert ("Q00016", "R000019") in submission_scores(done)
    shards = list(work.rglob("*.pkl"))
    assert len({p.parent for p in shards}) >= 5  # local (2), global (2), detection
    for path in shards:
        shard = safe_pickle.load(path, mmap_mode="r")
        assert isinstance(shard, dict) and shard["ids"]
    inputs = {p.stat().st_ino for p in files_under(queries) + files_under(refs)}
    assert not inputs & {p.stat().st_ino for p in files_under(work)}


def test_a_planted_shard_in_the_work_folder_never_runs(photos: Path, tmp_path: Path) -> None:
    """The stage stops with one line naming the file and the refused global; deleting the
    file, as the line says, recomputes it."""
    work, marker = tmp_path / "work", tmp_path / "pwned"
    store = store_path(load_config(), list_images(photos), work, mirror=False)
    shard = plant(store / "shard_00000.pkl", marker)
    args = ("local_fea.extract", "--images", photos, "--work", work, "--n-jobs", "1")
    line = one_line_error(command(*args))
    assert line == (f"error: {shard} holds pathlib.Path.touch, which is not plain data: "
                    "refusing to load it (delete it to recompute)")
    assert not marker.exists()
    shard.unlink()
    assert command(*args).returncode == 0 and not marker.exists()
    assert ShardStore(store).load(0)["ids"] == list(list_images(photos).ids)


def test_the_safe_loader_maps_arrays_and_refuses_globals(tmp_path: Path) -> None:
    data = {"ids": ["a", "b"], "status": ["", "gone"], "n": np.int64(3),
            "x": np.arange(12, dtype=np.float32).reshape(3, 4), "nested": {"t": (1, 2.5, None)},
            "names": np.array(["a", None], dtype=object)}
    path = dump_joblib(data, tmp_path / "shard.pkl")
    mapped = safe_pickle.load(path, mmap_mode="r")
    assert isinstance(mapped["x"], np.memmap) and np.array_equal(mapped["x"], data["x"])
    assert mapped["nested"] == data["nested"] and list(mapped["names"]) == ["a", None]
    assert not isinstance(safe_pickle.load(path)["x"], np.memmap)
    marker = tmp_path / "pwned"
    hidden = np.array([Payload(marker)], dtype=object)  # inside an object array
    for payload in (Payload(marker), hidden, {"deep": [Payload(marker)]}):
        joblib.dump(payload, tmp_path / "bad.pkl")
        with pytest.raises(UserError, match=r"pathlib\.Path\.touch, which is not plain data"):
            safe_pickle.load(tmp_path / "bad.pkl", mmap_mode="r")
    assert not marker.exists()


# Data safety -------------------------------------------------------------------------------

def test_detection_never_links_nor_copies_an_input(photos: Path, tmp_path: Path,
                                                    conf) -> None:
    """Queries without a crop used to be hard-linked into the crop folders (a write there
    reached the input), then copied (twice the query set's bytes): now nothing of theirs is
    written; the crops are new files."""
    work = tmp_path / "work"
    boxes = detect.main(conf, photos, work)
    crops = [p for p in files_under(boxes.parent) if p.parent.name.endswith(("-crop_local",
                                                                              "-crop_global"))]
    used = {r["query_id"] for r in csv.DictReader(boxes.open()) if r["used_for"]}
    assert {p.stem for p in crops} == used
    inputs = {p.stat().st_ino for p in photos.iterdir()}
    assert not inputs & {p.stat().st_ino for p in files_under(work)}


def hold_lock(work: Path) -> subprocess.Popen:
    """A live process holding ``work``'s lock (what a run in progress does)."""
    code = ("import sys, time; from common.lock import work_lock\n"
            "with work_lock(sys.argv[1], 'run'):\n print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([python(), "-c", code, str(work)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True, env=offline_env())
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_one_run_per_work_folder_and_a_killed_holder_never_blocks(photos: Path,
                                                                   tmp_path: Path) -> None:
    work = tmp_path / "work"
    holder = hold_lock(work)
    try:
        line = one_line_error(command("copydet", "run", "--queries", photos, "--references",
                                      photos, "--work", work, *LOCAL_MAX))
        assert f"work folder {work} is in use by pid {holder.pid} on " in line
        assert "(run: " in line and "started 20" in line
        one_line_error(command("local_fea.extract", "--images", photos, "--work", work))
        assert not (work / "local_fea").exists()  # stopped before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = command("local_fea.extract", "--images", photos, "--work", work, "--n-jobs", "1")
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with work_lock(tmp_path, "outer"), work_lock(tmp_path / ".", "inner"):
        assert json.loads((tmp_path / ".lock").read_text())["command"] == "outer"
    with work_lock(tmp_path, "again"):
        pass


def test_a_planted_lock_link_is_refused_and_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="lock"), work_lock(work, "run"):
        pass
    assert victim.read_text() == "precious"
    (work / ".lock").unlink()
    os.mkfifo(work / ".lock")  # opens without blocking read-write, but is no file
    with pytest.raises(UserError, match="not a plain file"), work_lock(work, "run"):
        pass


def test_clean_stale_tmp_keeps_the_files_of_live_writers(tmp_path: Path) -> None:
    finished = subprocess.run([python(), "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    live = tmp_path / f"shard_00000.pkl.tmp-{os.getpid()}"
    dead = tmp_path / f"shard_00001.pkl.tmp-{finished.stdout.strip()}"
    for path in (live, dead):
        path.write_bytes(b"partial")
    assert clean_stale_tmp(tmp_path) == 1
    assert live.exists() and not dead.exists()


@pytest.mark.slow
def test_queries_equal_to_references_find_copies_among_the_other_images(tmp_path: Path) -> None:
    """One folder as both sets: Q00031 is an edited copy of R000011, Q00016 of R000019."""
    images = demo_folder(tmp_path / "images", ["R000011", "Q00031", "R000019", "Q00016",
                                               "R000000", "R000001"])
    done = command("copydet", "run", "--queries", images, "--references", images,
                   "--work", tmp_path / "work", *LOCAL_MAX)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = submission_scores(done)
    assert scores and not [p for p in scores if p[0] == p[1]]
    copies = [("Q00031", "R000011"), ("R000011", "Q00031")]
    assert max(scores.get(p, 0.0) for p in copies) > 0.5
    record = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    assert record["self_pairs_left_out"] is True
    candidates = read_csv(Path(record["branches"]["local"]["candidates"]))
    assert candidates and all(r["query_id"] != r["reference_id"] for r in candidates)


# One-line errors ---------------------------------------------------------------------------

def test_a_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    """ENOSPC from any writer (and faiss' translation of it) is one line naming the file;
    other OS errors are not taken for it."""

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(joblib, "dump", full)
    out = tmp_path / "store" / "shard_00000.pkl"
    with pytest.raises(SystemExit) as stop:
        report_errors(lambda: dump_joblib({"a": 1}, out), tmp_path)  # a stage's work folder
    assert stop.value.code == EXIT_USER_ERROR and not list(out.parent.iterdir())
    assert capsys.readouterr().err == (f"error: disk full while writing {out}: free space or "
                                       "use another --work; finished work is kept\n")
    with pytest.raises(SystemExit):  # a script with no work folder: no --work to advise
        report_errors(lambda: dump_joblib({"a": 1}, out))
    assert capsys.readouterr().err.endswith(": free space or write elsewhere; finished work "
                                            "is kept\n")

    def faiss_full() -> None:
        raise RuntimeError("Error in faiss::FileIOWriter::operator() at io.cpp:68: write error "
                           "in /w/index.faiss: 0 != 1 (No space left on device)")

    with pytest.raises(SystemExit):
        report_errors(faiss_full)
    assert capsys.readouterr().err.startswith("error: disk full while writing /w/index.faiss:")
    with pytest.raises(SystemExit) as stop:
        report_errors(lambda: (tmp_path / "missing").read_bytes(), tmp_path)  # traceback there
    assert stop.value.code == EXIT_BUG
    assert capsys.readouterr().err.startswith("error: unexpected FileNotFoundError")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs with 40 kB left (root only; skipped where mounting is not allowed)."""
    with tmpfs(tmp_path / "disk", "size=2m") as mount:
        fill(mount, leave=40 * 1024)
        yield mount


def test_a_full_disk_stops_a_stage_with_one_line(photos: Path, small_disk: Path) -> None:
    work = small_disk / "work"
    done = command("local_fea.extract", "--images", photos, "--mirror", "--work", work,
                   "-o", "run.shard_size=2", "--n-jobs", "1")
    line = one_line_error(done)
    assert line.startswith("error: disk full while writing ")
    assert line.endswith(": free space or use another --work; finished work is kept")
    assert not [p for p in work.rglob("*") if ".tmp-" in p.name]  # nothing half-written


def test_a_misspelt_key_is_one_line(photos: Path, tmp_path: Path) -> None:
    """On the command line (fixed by the restructure: the configuration is loaded inside the
    error handling) and in a ``--config`` file (was silently ignored)."""
    args = ("local_fea.extract", "--images", photos, "--work", tmp_path / "work")
    line = one_line_error(command(*args, "-o", "local_fea.shortside=300"))
    assert "unknown key 'shortside'" in line
    user = tmp_path / "my.yaml"
    user.write_text("local_fea:\n  shortside: 300\n")
    line = one_line_error(command(*args, "--config", user))
    assert "unknown setting local_fea.shortside" in line
    assert not (tmp_path / "work" / "local_fea").exists()


@pytest.mark.parametrize("bad, allowed", [
    ("local_fea.short_side=-5", "an integer >= 32"),
    ("local_fea.short_side=300.5", "an integer >= 32"),
    ("local_search.k=1", "an integer >= 2"),
    ("local_search.gpu=maybe", "true or false or auto"),
    ("match_score.ransac_confidence=1.5", "a number > 0 and <= 1"),
    ("global_fea.pool=median", "one of gem, avg, max"),
    ("global_fea.std=[0.5, 0, 0.5]", "a list of 3 items, each a number > 0"),
    ("global_fea.workers=-2", "an integer >= 0 or auto"),
    ("global_fea.batch_size=0", "an integer >= 1 or auto"),
    ("merge.method=best", "one of fusion, max"),
    ("preprocess.crop_quality=101", "an integer >= 1 and <= 100"),
    ("run.lock_wait_s=-1", "a number >= 0"),
    ("local_fea.name=s{shortside}", "not a template of local_fea's keys"),
    ("merge.branches=[]", "a list of at least 1 item(s)"),
    ("merge.branches=[local, local]", "each different"),
])
def test_invalid_values_are_refused_before_any_work(bad: str, allowed: str) -> None:
    key, value = bad.split("=", 1)
    with pytest.raises(UserError) as refused:
        load_config(overrides=[bad])
    assert key in str(refused.value) and allowed in str(refused.value)
    assert value.split(",")[0].strip("[") in str(refused.value)


def test_the_defaults_and_their_kinds_of_values_pass(tmp_path: Path) -> None:
    defaults = load_config()
    validate(defaults, defaults)
    load_config(DEFAULT_CONFIG, ["local_search.gpu=false", "global_search.gpu=true",
                                 "global_fea.workers=2", "global_fea.device=[0, 1]",
                                 "preprocess.device=cuda:0", "match_score.ransac_px=4",
                                 "run.scheduler=tcp://head:8786", "run.lock_wait_s=2.5",
                                 "local_fea.edge_threshold=12.5", "merge.branches=[global]"])
    commented_out = tmp_path / "my.yaml"
    commented_out.write_text("merge:\n  # method: max\n")  # a section with no key left
    assert load_config(commented_out)["merge"] == load_config()["merge"]


def test_an_invalid_value_stops_a_stage_with_one_line(photos: Path, tmp_path: Path) -> None:
    line = one_line_error(command("local_fea.extract", "--images", photos, "--work",
                                  tmp_path / "work", "-o", "local_fea.short_side=-5"))
    assert line == ("error: local_fea.short_side=-5 is not allowed: it takes an integer >= 32")


@pytest.mark.parametrize("empty_role", ["queries", "references"])
def test_an_empty_folder_is_one_line_before_any_work(photos: Path, tmp_path: Path,
                                                     empty_role: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    folders = {"queries": photos, "references": photos, empty_role: empty}
    work = tmp_path / "work"
    line = one_line_error(command("copydet", "run", "--queries", folders["queries"],
                                  "--references", folders["references"], "--work", work))
    assert line.startswith(f"error: {empty} holds no images")
    assert not [p for p in work.iterdir() if p.name != ".lock"]


def test_a_broken_symlink_is_skipped_with_a_reason(photos: Path, tmp_path: Path, conf) -> None:
    os.symlink(tmp_path / "gone.jpg", photos / "broken.jpg")
    work = tmp_path / "work"
    root = extract.main(conf, photos, work)
    for report, column in ((root / "skipped.csv", "id"),
                           (next((work / "runs").glob("*extract*")) / "skipped.csv", "item")):
        with open(report) as f:
            reasons = {r[column]: r["reason"] for r in csv.DictReader(f)}
        assert reasons == {"broken": f"broken symbolic link to {tmp_path / 'gone.jpg'}"}


def test_images_without_keypoints_are_in_the_store_report(photos: Path, tmp_path: Path,
                                                          conf) -> None:
    Image.new("L", (400, 300), 128).save(photos / "flat.png")
    root = extract.main(conf, photos, tmp_path / "work")
    with open(root / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["flat"] and rows[0]["reason"].startswith("no keypoints")
    assert rows[0]["path"] == str(photos.resolve() / "flat.png")



def test_a_folder_of_unreadable_images_gives_empty_descriptors(photos: Path,
                                                               tmp_path: Path) -> None:
    """Not empty, but nothing in it can be read: the global descriptors of the set are an
    empty table (was: h5py's 'Chunk shape must not be greater than data shape')."""
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.jpg", "b.png"):
        (unreadable / name).write_text("not an image")
    done = command("global_fea.extract", "--queries", photos, "--references", unreadable,
                   "--work", tmp_path / "work")
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(done.stdout.strip().splitlines()[-1], "r") as f:
        assert f["reference"].shape[0] == 0 and f["query"].shape == (6, 256)
