"""Command lines of the stages: each stage module declares one ``Command`` (its own argument
group and how the parsed arguments call its ``main``); ``copydet <command>``
(``copydet.cli``) and ``python -m <stage module>`` both run it through ``run_command``,
which holds the work folder's lock (``common.lock``) for the run and is the one place where a
user error or a full disk becomes one line on stderr and exit code ``EXIT_USER_ERROR``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import UserError
from common.config import load_config
from common.io import DISK_FULL
from common.lock import work_lock
from common.logs import setup_console
from common.parallel import execution

EXIT_USER_ERROR = 2  # what a user can fix (also argparse's code for a bad command line)
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|write error in (\S+?):")


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
    ``write error``, HDF5)."""
    found = None
    while err is not None:
        name = None
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            name = str(err.filename or "")
        elif isinstance(err, OSError | RuntimeError) and (text := DISK_FULL_TEXT.search(str(err))):
            name = text.group(1) or ""
        if name is not None and (found is None or name):
            found = name
        err = err.__cause__ or err.__context__
    return found


def fail(message: str) -> None:
    """The one line of a user error, and its exit code."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None


def report_errors(call: Callable[[], Any], work: Path | None = None) -> Any:
    """Run ``call()`` and print its result; a user error or a full disk is one line on stderr
    and exit ``EXIT_USER_ERROR``, the same for every command (finished work is kept: every
    output is written atomically)."""
    setup_console()
    try:
        result = call()
    except UserError as err:
        fail(str(err))
    except (OSError, RuntimeError) as err:
        where = disk_full(err)
        if where is None:
            raise
        fail(f"disk full while writing {where or work or 'the outputs'}: free space or use "
             "another --work; finished work is kept")
    if result is not None:
        print(result)
    return result


def run_script(call: Callable[[], Any]) -> int:
    """The body of a standalone script (the builders of ``data/``, ``preprocess.synth``):
    progress and INFO logs on stderr, then ``report_errors``; a missing or already written
    folder or a value out of range (``FileExistsError``, ``FileNotFoundError``,
    ``ValueError``) is a user error like any other. What it made (a path) is printed."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def checked() -> Any:
        try:
            return call()
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from None

    made = report_errors(checked)
    if made is not None:
        print(made)
    return 0


def run_module(module: str, argv: Sequence[str] | None = None) -> Any:
    """``python -m <module>``: run the module's ``COMMAND``. The module is imported under its
    package name (not as ``__main__``), so its functions pickle for worker processes."""
    command: Command = importlib.import_module(module).COMMAND
    args = command.parser(prog=f"python -m {module}").parse_args(argv)
    return run_command(command, args)
