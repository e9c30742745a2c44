"""Command lines of the stages: each stage module declares one ``Command`` (its own argument
group and how the parsed arguments call its ``main``); ``copydet <command>``
(``copydet.cli``) and ``python -m <stage module>`` both run it through ``run_command``,
which holds the work folder's lock (``common.lock``) for the run.

``report_errors`` is the one place where a command ends. Whatever ends it, its worker processes
are stopped first (``common.parallel.stop_workers``); then a user error, a full disk, a
read-only or forbidden place, a worker process that died (out of memory) is one line
``error: …`` on stderr and exit code ``EXIT_USER_ERROR``; Ctrl-C (SIGINT), SIGTERM and SIGHUP
are one line and exit code 128 + the signal's number (130, 143, 129); an unexpected error (a
bug) is one line naming the file that keeps its traceback, and exit code ``EXIT_BUG``. Finished
work is kept in every case: every output is written atomically, and running the command again
resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import logging
import multiprocessing
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from joblib.externals.loky.process_executor import TerminatedWorkerError

from common import UserError
from common.config import REPO_ROOT, load_config
from common.io import DISK_FULL, NOT_WRITABLE, without_tmp
from common.lock import work_lock
from common.logs import one_line, save_traceback, setup_console
from common.parallel import execution, stop_workers

EXIT_BUG = 1  # an unexpected error: Python's own code for an uncaught exception
EXIT_USER_ERROR = 2  # what a user can fix (also argparse's code for a bad command line)
EXIT_SIGNAL = 128  # + the signal's number, as a shell reports a process a signal ended
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # raise ``Stopped``; SIGINT: KeyboardInterrupt
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|write error in (\S+?):")
KEPT = "finished work is kept"


@dataclass(frozen=True)
class Command:
    """A stage's command line: ``add_arguments`` fills its parser, ``call(conf, args)`` runs
    it and returns what it wrote (printed, so scripts can chain stages by their outputs)."""

    name: str
    doc: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    call: Callable[[dict[str, Any], argparse.Namespace], Any]

    @property
    def summary(self) -> str:
        return self.doc.strip().split("\n")[0].removeprefix("Stage: ")

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog, description=self.summary)
        self.configure(parser)
        return parser

    def configure(self, parser: argparse.ArgumentParser) -> None:
        self.add_arguments(parser)
        add_common_args(parser)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--work", type=lambda s: Path(s).resolve(), default=Path("work").resolve(),
                       help="work folder for all outputs (default: work)")
    group.add_argument("--config", type=Path, help="YAML file overriding config.yaml")
    group.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. -o local_fea.short_side=400")
    group.add_argument("--n-jobs", type=int, help="worker processes (default: run.n_jobs)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="run the parallel work on a Dask cluster: scheduler address "
                            "(tcp://host:8786) or scheduler JSON file (default: run.scheduler; "
                            "none = local processes)")


def add_set_args(parser: argparse.ArgumentParser) -> None:
    """``--queries`` and ``--references``: the two image folders of a run."""
    parser.add_argument("--queries", required=True, type=Path, help="query image folder")
    parser.add_argument("--references", required=True, type=Path,
                        help="reference image folder")


def add_fit_args(parser: argparse.ArgumentParser, model_key: str) -> None:
    """``--photos`` and ``--out`` of a calibration that writes the ``model_key`` model."""
    parser.add_argument("--photos", required=True, type=Path,
                        help="training photos (never the references of a test set)")
    parser.add_argument("--out", type=Path, help=f"model file (default: {model_key})")


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = list(args.override)
    if args.n_jobs is not None:
        overrides.append(f"run.n_jobs={args.n_jobs}")
    if args.scheduler is not None:  # "none" (the help's word) or "null": local processes
        local = args.scheduler.strip().lower() in ("", "none", "null")
        overrides.append(f"run.scheduler={'null' if local else args.scheduler}")
    return load_config(args.config, overrides)


def run_command(command: Command, args: argparse.Namespace) -> Any:
    """Run a parsed command on the configured executor (local processes, or the Dask cluster
    of ``run.scheduler``), holding its work folder."""

    def call() -> Any:
        conf = config_from_args(args)
        with (work_lock(args.work, command.name, conf["run"]["lock_wait_s"]),
              execution(conf["run"])):
            return command.call(conf, args)

    return report_errors(call, args.work)


def disk_full(err: BaseException | None) -> str | None:
    """If ``err`` arose from a full disk: the file being written then (the deepest error of
    its chain that names one), or an empty string when unknown; None otherwise. Covers
    ``OSError`` ENOSPC/EDQUOT and the messages of libraries that translate it (faiss
    ``write error``, HDF5). A temporary file is named by the output it was written for."""
    found = None
    while err is not None:
        name = None
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            name = without_tmp(str(err.filename or ""))
        elif isinstance(err, OSError | RuntimeError) and (text := DISK_FULL_TEXT.search(str(err))):
            name = without_tmp(text.group(1) or "")
        if name is not None and (found is None or name):
            found = name
        err = err.__cause__ or err.__context__
    return found


class Stopped(KeyboardInterrupt):
    """A signal that stops a run (``STOP_SIGNALS``), raised in the main thread as Ctrl-C raises
    ``KeyboardInterrupt``, so that the run unwinds as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signal_handlers(signums: Sequence[int], handler: Any) -> Iterator[None]:
    """``handler`` for the signals ``signums`` within the block (in the main thread only:
    elsewhere Python cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop(signum: int, frame: object) -> NoReturn:
    """The handler of ``STOP_SIGNALS`` while a command runs."""
    raise Stopped(signum)


def ending(err: BaseException, work: Path | None = None) -> tuple[str, int]:
    """The one line (without ``error: ``) and the exit code of a command that ``err`` ends."""
    if isinstance(err, TerminatedWorkerError) and "SIGINT" in str(err):
        err = KeyboardInterrupt()  # Ctrl-C ended a worker first (``parallel``)
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        return (f"stopped by {name}: {KEPT}; run the same command again to resume",
                EXIT_SIGNAL + signum)
    if isinstance(err, UserError):
        return str(err), EXIT_USER_ERROR
    if isinstance(err, TerminatedWorkerError):  # killed: out of memory, most often
        codes = re.search(r"exit codes of the workers are (\S.*)", str(err))
        return (f"a worker process died (exit codes {codes.group(1) if codes else 'unknown'}): "
                f"if the machine ran out of memory, lower run.n_jobs or run.shard_size; {KEPT}",
                EXIT_USER_ERROR)
    if type(err).__name__ == "KilledWorker":  # Dask's: a task whose workers kept dying
        task = getattr(err, "task", "a task")
        return (f"Dask workers died running {task}: if they ran out of memory, give them more "
                f"or lower run.shard_size; {KEPT}", EXIT_USER_ERROR)
    elsewhere = "use another --work" if work else "write elsewhere"
    if (where := disk_full(err)) is not None:
        return (f"disk full while writing {where or work or 'the outputs'}: free space or "
                f"{elsewhere}; {KEPT}", EXIT_USER_ERROR)
    if isinstance(err, OSError) and err.errno in NOT_WRITABLE:
        where = without_tmp(str(err.filename or work or "the outputs"))
        if err.errno == errno.EROFS:
            return (f"cannot write {where}: the file system is read-only: {elsewhere}; "
                    f"{KEPT}", EXIT_USER_ERROR)
        output = work is not None and Path(where).is_relative_to(work)
        return (f"permission denied for {where}: give this user access to it"
                f"{f', or {elsewhere}' if output else ''}; {KEPT}", EXIT_USER_ERROR)
    return bug(err, work), EXIT_BUG


def bug(err: BaseException, work: Path | None) -> str:
    """The line of an unexpected error: where it arose, and the file keeping its traceback
    (the traceback itself on stderr where no file can take it)."""
    saved = save_traceback(err, work)
    if saved is None:
        traceback.print_exception(err, file=sys.stderr)
    kept = f"its traceback is in {saved}" if saved else "its traceback is above"
    return f"unexpected {one_line(err)}{where_raised(err)}: a bug; {kept}, please report it; {KEPT}"


def where_raised(err: BaseException) -> str:
    """`` at <file>:<line>``: the deepest frame of the traceback in this repository's code
    (not a library's), or the deepest frame at all."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if Path(f.filename).is_relative_to(REPO_ROOT)
            and "site-packages" not in Path(f.filename).parts]
    if not (frames := ours or frames):
        return ""
    path = Path(frames[-1].filename)
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name
    return f" at {shown}:{frames[-1].lineno}"


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """The one line of a command that ends without its result, and its exit code."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code) from None


def release(err: BaseException) -> None:
    """Drop what the frames of ``err`` and of the errors it chains hold (open files, HDF5
    objects, data loaders) now, not in the interpreter's last garbage collection, after the
    libraries they belong to have shut down."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()


def report_errors(call: Callable[[], Any], work: Path | None = None) -> Any:
    """Run ``call()`` and print its result; on every way out, stop the worker processes
    first. Whatever else ends it (an error, a signal) is one line on stderr and an exit code
    (module docstring); a ``SystemExit`` keeps its own."""
    setup_console()
    before = multiprocessing.active_children()  # a caller's own (a Dask LocalCluster) stay
    try:
        with signal_handlers(STOP_SIGNALS, stop):
            result = call()
    except BaseException as err:
        with signal_handlers((signal.SIGINT, *STOP_SIGNALS), signal.SIG_IGN):  # a 2nd Ctrl-C
            stop_workers(before)
            if isinstance(err, SystemExit):
                raise
            message, code = ending(err, work)
            release(err)
        fail(message, code)
    stop_workers(before)
    if result is not None:
        print(result)
    return result


def run_script(call: Callable[[], Any]) -> int:
    """The body of a standalone script (the builders of ``data/``, ``preprocess.synth``):
    progress and INFO logs on stderr, then ``report_errors``; a missing or already written
    folder or a value out of range (``FileExistsError``, ``FileNotFoundError``,
    ``ValueError``) is a user error like any other. What it made (a path) is printed once."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def checked() -> Any:
        try:
            return call()
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None

    report_errors(checked)  # prints what it made
    return 0


def run_module(module: str, argv: Sequence[str] | None = None) -> Any:
    """``python -m <module>``: run the module's ``COMMAND``. The module is imported under its
    package name (not as ``__main__``), so its functions pickle for worker processes."""
    command: Command = importlib.import_module(module).COMMAND
    args = command.parser(prog=f"python -m {module}").parse_args(argv)
    return run_command(command, args)
