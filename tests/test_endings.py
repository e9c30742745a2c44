"""Fail well (issue 28): every way a run can end is one ``error:`` line naming the file and
what to do, with its exit code, after the workers stopped; no process of a run outlives it,
and running again resumes to the same submission."""

from __future__ import annotations

import csv
import errno
import io
import os
import signal
import socket
import stat
import subprocess
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest

import pipeline
from common import UserError, knn
from common.cli import EXIT_BUG, EXIT_SIGNAL, EXIT_USER_ERROR, ending, report_errors
from common.config import REPO_ROOT, load_config
from common.h5write import PAGE, WriteGuard, atomic_h5
from common.images import ImageError, list_images, read_image
from common.io import dump_joblib, write_csv, write_json
from common.lock import work_lock
from common.parallel import parallel_map, stop_workers
from evaluation.report.page import building
from global_fea import extract as global_extract
from global_fea import runtime, weights
from local_fea import extract
from local_fea.index import write_index
from pipeline import checks
from tests.conftest import fill, offline_env, python, tmpfs
from tests.test_adversarial import demo_folder, one_line_error

QUERIES = ["Q00016", "Q00031", "Q00003"]
REFERENCES = ["R000019", "R000011", "R000017", "R000000"]
SETTINGS = ("-o", "run.shard_size=1", "-o", "run.n_jobs=2")
KEPT = "finished work is kept"


# Helpers -----------------------------------------------------------------------------------

class Run:
    """``python -m copydet run`` in a subprocess of its own session, its output in files
    under ``output`` (a process that outlives it cannot hold a pipe open), every process it
    starts marked."""

    def __init__(self, output: Path, queries: Path, references: Path, work: Path,
                 *options: str):
        self.mark = uuid.uuid4().hex
        self.out, self.err = output / f"{self.mark}.out", output / f"{self.mark}.err"
        args = [python(), "-m", "copydet", "run", "--queries", str(queries), "--references",
                str(references), "--work", str(work), *SETTINGS, *options]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=out, stderr=err,
                                         env={**offline_env(), "COPYDET_TEST_RUN": self.mark},
                                         start_new_session=True)

    def wait(self) -> subprocess.CompletedProcess:
        """The ended run (its output as ``capture_output`` gives it), once none of its
        processes is left."""
        code = self.proc.wait(timeout=300)
        assert no_process_left(self.mark), f"processes outlived the run: {marked(self.mark)}"
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read_text(),
                                           self.err.read_text())


def marked(mark: str) -> list[str]:
    """Command lines of the live processes whose environment holds ``mark``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # ended meanwhile
            continue
    return found


def no_process_left(mark: str, grace_s: float = 5.0) -> bool:
    """Whether every process marked ``mark`` is gone (within ``grace_s``: a resource tracker
    ends when it reads the end of its pipe, just after the run)."""
    deadline = time.monotonic() + grace_s
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not marked(mark)


def run(output: Path, queries: Path, references: Path, work: Path, *options: str
        ) -> subprocess.CompletedProcess:
    return Run(output, queries, references, work, *options).wait()


def submission(done: subprocess.CompletedProcess) -> bytes:
    """The bytes of the submission a finished run printed."""
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1]).read_bytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three demo queries (one an edited copy of a reference) and four references."""
    root = tmp_path_factory.mktemp("images")
    return demo_folder(root / "q", QUERIES), demo_folder(root / "r", REFERENCES)


@pytest.fixture(scope="module")
def expected(images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The submission of a run that nothing stopped."""
    clean = tmp_path_factory.mktemp("clean")
    return submission(run(clean, *images, clean / "work"))


# Signals -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_stops_a_run_in_one_line_and_a_rerun_resumes(
        images: tuple[Path, Path], expected: bytes, tmp_path: Path, signum: int,
        to_group: bool) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the
    run alone, while its workers describe images: one line, 128 + the signal, no worker left;
    the interrupted stage's log says "stopped", not "done"; running again resumes to the
    submission of an uninterrupted run."""
    work = tmp_path / "work"
    started = Run(tmp_path, *images, work)
    deadline = time.monotonic() + 120
    while not list(work.glob("local_fea/*/*/shard_*.pkl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (os.killpg if to_group else os.kill)(started.proc.pid, signum)
    line = one_line_error(started.wait(), EXIT_SIGNAL + signum)
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert line == f"error: stopped by {name}: {KEPT}; run the same command again to resume"
    logs = [p.read_text() for p in work.glob("runs/*/run.log")]
    [stopped] = [log for log in logs if " stopped (" in log]  # the stage the signal stopped
    assert " done: " not in stopped
    assert submission(run(tmp_path, *images, work)) == expected
    assert not list(work.rglob("*.tmp-*"))  # those of killed workers: removed on resuming


# Full, read-only and forbidden places -------------------------------------------------------

@pytest.mark.slow
def test_a_disk_that_fills_while_the_h5_is_written(images: tuple[Path, Path], expected: bytes,
                                                   tmp_path: Path) -> None:
    """The h5 of the global descriptors on a tmpfs with 4 kB left: one line naming it (was: a
    segmentation fault after h5py's "Can't decrement id ref count", a message naming the work
    folder, and loky workers left running); freed, the run resumes."""
    work = tmp_path / "work"
    conf = load_config(overrides=["run.shard_size=1"])
    roots = [global_extract.model_root(conf, work) / list_images(folder).key
             for folder in images]
    h5 = global_extract.h5_path(conf, *roots, work)
    with tmpfs(h5.parent, "size=64k") as disk:
        fill(disk, leave=4096)
        line = one_line_error(run(tmp_path, *images, work))
        assert line == (f"error: disk full while writing {h5}: free space or use another "
                        f"--work; {KEPT}")
        assert [p.name for p in disk.iterdir()] == ["filler"]
    assert submission(run(tmp_path, *images, work)) == expected


@pytest.mark.parametrize("made_first", [False, True])
def test_a_read_only_work_folder_is_one_line_before_any_work(
        images: tuple[Path, Path], tmp_path: Path, made_first: bool) -> None:
    """A work folder to be created on a read-only mount, or one made there before the mount
    became read-only (was: a traceback from ``folder.mkdir`` in common/lock.py)."""
    mount = tmp_path / "mount"
    with tmpfs(mount, "size=1m") as disk:
        work = disk / "work"
        if made_first:
            work.mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        line = one_line_error(run(tmp_path, *images, work))
        assert line == (f"error: cannot write in the work folder {work} (Read-only file "
                        "system): make it writable, or use another --work")


def test_a_work_folder_without_permission_is_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Tests run as root, whom no permission stops: the file system is told to refuse."""

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    work = tmp_path / "work"
    monkeypatch.setattr(Path, "mkdir", refused)

    def locked() -> None:
        with work_lock(work, "run"):
            pytest.fail("the lock was taken")

    with pytest.raises(SystemExit) as stop:
        report_errors(locked, work)
    assert stop.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == (f"error: cannot write in the work folder {work} "
                                       "(Permission denied): make it writable, or use another "
                                       "--work\n")


def network_export(out: Path) -> None:
    runtime.export(weights.build(load_config()["global_fea"]), out)


def report_file(out: Path) -> None:
    with building(out) as folder:
        (folder / "index.html").write_text("<html></html>")


def faiss_index(out: Path) -> None:
    index = faiss.IndexFlatL2(8)
    index.add(np.zeros((4096, 8), np.float32))
    write_index(index, out)


def h5_file(out: Path) -> None:
    with atomic_h5(out) as (f, _):
        f.create_dataset("reference", data=np.ones((64, 256), np.float32))


WRITERS: dict[str, tuple[Callable[[Path], object], str]] = {  # the writer, its output's name
    "shard": (lambda out: dump_joblib({"desc": np.ones((64, 64))}, out), "shard_00000.pkl"),
    "csv": (lambda out: write_csv(out, ["a", "b"], [(1, 2)] * 100), "pairs.csv"),
    "json": (lambda out: write_json(out, {"a": list(range(100))}), "manifest.json"),
    "h5": (h5_file, "descriptors.h5"),
    "faiss": (faiss_index, "index.faiss"),
    "onnx": (network_export, "network.onnx"),
    "report": (report_file, "report"),  # a folder, built beside it and renamed
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_at_each_writer_is_one_line_naming_its_output(
        writer: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each kind of output written on a tmpfs with no space left: one line naming the output
    (never its temporary file), exit code 2, nothing left behind (the ONNX export no longer
    falls back to torch, the h5 no longer crashes the interpreter)."""
    write, name = WRITERS[writer]
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        filler = fill(disk)
        out = disk / name
        with pytest.raises(SystemExit) as stop:
            report_errors(lambda: write(out), disk)  # the disk is the work folder
        assert stop.value.code == EXIT_USER_ERROR
        assert capsys.readouterr().err == (f"error: disk full while writing {out}: free "
                                           f"space or use another --work; {KEPT}\n")
        assert list(disk.iterdir()) == [filler]


def test_a_write_on_a_read_only_file_system_names_the_output(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    with tmpfs(tmp_path / "disk", "size=256k,ro") as disk:
        out = disk / "pairs.csv"
        with pytest.raises(SystemExit) as stop:
            report_errors(lambda: write_csv(out, ["a"], [(1,)]), disk)
    assert stop.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == (f"error: cannot write {out}: the file system is "
                                       f"read-only: use another --work; {KEPT}\n")


# Bugs, workers -----------------------------------------------------------------------------

def broken_stage() -> None:
    raise ValueError("an index out of its range")


def test_a_bug_is_one_line_naming_where_and_the_file_of_its_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        report_errors(broken_stage, tmp_path)
    assert stop.value.code == EXIT_BUG
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected ValueError: an index out of its range at "
                          f"tests/test_endings.py:{broken_stage.__code__.co_firstlineno + 1}: "
                          f"a bug; its traceback is in {tmp_path / 'runs'}/error-")
    assert err.count("\n") == 1 and "Traceback" not in err
    saved = Path(err.split("its traceback is in ")[1].split(",")[0])
    assert "Traceback" in saved.read_text() and "broken_stage" in saved.read_text()


def test_stop_workers_leaves_no_worker_process() -> None:
    """(``abs``: the workers import nothing of the pipeline for it.)"""
    assert sorted(parallel_map(abs, range(-4, 4), n_jobs=2)) == [0, 1, 1, 2, 2, 3, 3, 4]
    from joblib.externals.loky import reusable_executor

    workers = list(reusable_executor._executor._processes.values())
    assert workers and all(w.is_alive() for w in workers)
    stop_workers()
    assert not any(w.is_alive() for w in workers)
    assert sorted(parallel_map(abs, range(-2, 2), n_jobs=2)) == [0, 1, 1, 2]  # new workers


def test_a_worker_that_dies_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """A worker killed (by the out-of-memory killer, say; here it exits) is an environment
    error, not a bug; no worker is left."""
    with pytest.raises(SystemExit) as stop:
        report_errors(lambda: list(parallel_map(os._exit, [9, 9], n_jobs=2)))
    assert stop.value.code == EXIT_USER_ERROR
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert line in (f"error: a worker process died (exit codes {{EXIT({codes})}}): if the "
                    "machine ran out of memory, lower run.n_jobs or run.shard_size; "
                    f"{KEPT}" for codes in ("9", "9), EXIT(9"))
    from joblib.externals.loky import reusable_executor

    assert reusable_executor._executor is None or not reusable_executor._executor._processes


# Settings and inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("setting, branches", [
    ("global_fea.device=cuda:99", "[local, global]"),
    ("preprocess.device=cuda:99", "[local, crop_local]"),
])
def test_a_device_torch_cannot_see_stops_the_run_before_any_work(
        images: tuple[Path, Path], tmp_path: Path, setting: str, branches: str) -> None:
    work = tmp_path / "work"
    done = run(tmp_path, *images, work, "-o", setting, "-o", f"merge.branches={branches}",
               "-o", "merge.method=max")
    line = one_line_error(done)
    key = setting.split("=")[0]
    assert line.startswith(f"error: {key}=cuda:99 but torch sees ")
    assert [p.name for p in work.iterdir()] == [".lock"]


def sections(*branches: str) -> list[str]:
    """The settings sections of the stages of ``branches``."""
    return [s for b in branches for s in pipeline.BRANCHES[b].sections]


def test_a_device_of_a_branch_not_run_is_not_checked(tmp_path: Path) -> None:
    conf = load_config(overrides=["preprocess.device=cuda:99"])
    checks.check_devices(conf, sections("global"))
    with pytest.raises(UserError, match=r"preprocess\.device=cuda:99"):
        checks.check_devices(conf, sections("global", "crop_global"))
    with pytest.raises(UserError, match=r"preprocess\.device=cuda:99"):  # the frames' boxes
        checks.check_devices(conf, sections("local"))


def test_a_permission_denied_names_the_file_and_another_work_folder_only_for_outputs(
        tmp_path: Path) -> None:
    work, photos = tmp_path / "work", tmp_path / "photos"
    line, code = ending(PermissionError(errno.EACCES, "Permission denied", str(photos)), work)
    assert code == EXIT_USER_ERROR and line.startswith(f"permission denied for {photos}: give "
                                                       "this user access to it; ")
    line, _ = ending(PermissionError(errno.EACCES, "Permission denied", str(work / "a")), work)
    assert "or use another --work" in line


def test_a_worker_ended_by_ctrl_c_ends_the_run_as_ctrl_c() -> None:
    """Ctrl-C reaches the workers too; one that dies of it first is Ctrl-C, not a crash."""
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    died = TerminatedWorkerError("A worker process managed by the executor was unexpectedly "
                                 "terminated. The exit codes of the workers are {SIGINT(-2)}")
    assert ending(died) == (f"stopped by Ctrl-C (SIGINT): {KEPT}; run the same command again "
                            "to resume", 130)
    killed = TerminatedWorkerError("... The exit codes of the workers are {SIGKILL(-9)}")
    assert ending(killed)[0].startswith("a worker process died (exit codes {SIGKILL(-9)})")


def test_dask_workers_that_keep_dying_are_one_line() -> None:
    from distributed.scheduler import KilledWorker

    worker = types.SimpleNamespace(address="tcp://10.0.0.1:1234")
    line, code = ending(KilledWorker("search_part-0", worker, 3))
    assert code == EXIT_USER_ERROR and line.startswith("Dask workers died running search_part-0")


@pytest.mark.skipif(knn.auto_backend().gpu, reason="a GPU is usable here")
def test_a_search_that_requires_a_gpu_is_refused_before_any_work_without_one() -> None:
    conf = load_config(overrides=["global_search.gpu=true"])
    checks.check_devices(conf, sections("local", "crop_local"))  # no global search
    with pytest.raises(UserError, match=r"global_search\.gpu is true but no GPU is usable"):
        checks.check_devices(conf, sections("local", "global"))


def test_free_space_that_looks_short_is_a_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    branches = list(load_config()["merge"]["branches"])
    need = checks.estimated_bytes(branches, 50_000, 1_000_000)
    assert 1e11 < need < 1e12  # the devset's scale: a few hundred GB
    checks.check_space(tmp_path, 0)
    assert not caplog.records
    checks.check_space(tmp_path, 1e18)
    [record] = caplog.records
    assert record.levelname == "WARNING" and str(tmp_path) in record.getMessage()
    assert "may write up to about 1000000000.00 GB" in record.getMessage()


@pytest.fixture
def special_files(photos: Path) -> Iterator[dict[str, str]]:
    """A FIFO, a socket and a character device named like images, and a FIFO that is not:
    the reasons the first three are skipped for."""
    os.mkfifo(photos / "pipe.jpg")
    os.mkfifo(photos / "notes.txt")
    os.mknod(photos / "null.png", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(photos / "sock.jpg"))
    try:
        yield {"pipe": "not a regular file: a named pipe (FIFO), not read",
               "sock": "not a regular file: a socket, not read",
               "null": "not a regular file: a character device, not read"}
    finally:
        sock.close()


def test_special_files_in_an_input_folder_are_skipped_with_a_reason(
        photos: Path, tmp_path: Path, conf: dict, special_files: dict[str, str]) -> None:
    """Were dropped without a word; now each is said once, in the log and in skipped.csv, and
    none is opened (a FIFO would block the run)."""
    images = list_images(photos)
    assert set(special_files) <= set(images.ids)
    assert [p.name for p in images.ignored] == ["notes.txt"]
    with pytest.raises(ImageError, match="named pipe"):
        read_image(photos / "pipe.jpg")
    work = tmp_path / "work"
    extract.main(conf, photos, work)
    [report] = (work / "runs").glob("*extract*/skipped.csv")
    with open(report) as f:
        assert {r["item"]: r["reason"] for r in csv.DictReader(f)} == special_files


def test_an_h5_that_cannot_be_written_leaves_no_file(tmp_path: Path) -> None:
    """What the h5 writer leaves when its block fails: nothing (the temporary file removed
    after HDF5 closed it); and what it writes otherwise reads back."""
    out = tmp_path / "descriptors.h5"
    with pytest.raises(KeyError), atomic_h5(out) as (f, _):
        f.create_dataset("query", data=np.ones((3, 4), np.float32))
        raise KeyError("a stage failed")
    assert not list(tmp_path.iterdir())
    h5_file(out)
    with h5py.File(out, "r") as f:
        assert f["reference"].shape == (64, 256)


def test_the_h5_write_guard_reads_back_what_was_written_after_a_failure() -> None:
    """HDF5 reads back what it wrote: after a write that failed (the file takes no more bytes
    past ``limit``), the guard keeps the rest in memory, and every read sees every write."""

    class Small(io.BytesIO):
        def __init__(self, limit: int):
            super().__init__()
            self.limit = limit

        def write(self, data: bytes) -> int:
            if self.tell() + len(memoryview(data)) > self.limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    rng = np.random.default_rng(0)
    for limit in (0, PAGE // 3, 2 * PAGE + 5):
        guard, written = WriteGuard(Small(limit)), np.zeros(6 * PAGE, np.uint8)
        for _ in range(40):
            at, n = int(rng.integers(0, 4 * PAGE)), int(rng.integers(1, 2 * PAGE))
            data = rng.integers(0, 256, n, dtype=np.uint8)
            guard.seek(at)
            assert guard.write(data.tobytes()) == n and guard.tell() == at + n
            written[at:at + n] = data
            at, n = int(rng.integers(0, 5 * PAGE)), int(rng.integers(1, PAGE))
            guard.seek(at)
            assert guard.read(n) == written[at:at + n].tobytes()
        assert isinstance(guard.error, OSError) and guard.error.errno == errno.ENOSPC


def test_the_h5_write_guard_finishes_short_writes_and_knows_the_end_of_the_file() -> None:
    """An unbuffered write may take fewer bytes than given: the guard writes the rest; and
    ``seek(0, SEEK_END)`` (how HDF5 asks a file's size) is the end of what was written."""

    class Trickle(io.BytesIO):
        def write(self, data: bytes) -> int:
            return super().write(memoryview(data).cast("B")[:7])

    file = Trickle()
    guard = WriteGuard(file)
    guard.seek(100)
    assert guard.write(b"x" * 50) == 50 and file.getvalue() == b"\0" * 100 + b"x" * 50
    guard.seek(10)
    guard.write(b"y" * 5)
    assert guard.seek(0, os.SEEK_END) == 150 and guard.tell() == 150
    assert guard.truncate(120) == 120 and guard.seek(-20, os.SEEK_END) == 100
    assert guard.error is None
