"""Per-run logging and the report of skipped inputs.

``start_run`` sends log records to the console (through tqdm, so progress bars stay intact)
and to ``<work>/runs/<time>-<stage>/run.log``. ``RunLog.skip`` records an input that was left
out, with a one-line reason; ``RunLog.close`` writes those to ``skipped.csv`` in the same
folder and logs a summary: "done" when the stage is done, "stopped" when an exception (an
error, Ctrl-C) ends it. ``save_traceback`` keeps the traceback of an unexpected error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.io import write_csv, write_text

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SKIP_COLUMNS = ["item", "path", "reason"]


class TqdmHandler(logging.StreamHandler):
    """Write log lines above any active tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class RunFileHandler(logging.FileHandler):
    """A run's ``run.log``. A line it cannot write (a full disk) is dropped without logging's
    traceback: the command reports the full disk itself, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def setup_console(level: int = logging.INFO) -> None:
    """Console logging for command-line entry points (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, TqdmHandler) for h in root.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


@dataclass
class Skip:
    item: str
    path: str
    reason: str


@dataclass
class RunLog:
    """One stage run: its folder, log file and skipped inputs."""

    stage: str
    folder: Path
    logger: logging.Logger
    skipped: list[Skip] = field(default_factory=list)
    _handler: logging.Handler | None = None

    def skip(self, item: str, path: str | os.PathLike, reason: str) -> None:
        self.skipped.append(Skip(item, str(path), reason))
        self.logger.warning("skipped %s (%s): %s", item, path, reason)

    def close(self, error: BaseException | None = None) -> Path:
        """Write ``skipped.csv`` and say that the stage is done, or that ``error`` stopped it
        (then a report that cannot be written, on a full disk, is left out)."""
        report = self.folder / "skipped.csv"
        try:
            with contextlib.suppress(OSError) if error else contextlib.nullcontext():
                write_csv(report, SKIP_COLUMNS, [(s.item, s.path, s.reason)
                                                 for s in self.skipped])
            if error is None:
                self.logger.info("%s done: %d input(s) skipped, report %s", self.stage,
                                 len(self.skipped), report)
            else:
                self.logger.warning("%s stopped (%s): %d input(s) skipped so far",
                                    self.stage, one_line(error), len(self.skipped))
        finally:
            if self._handler is not None:
                logging.getLogger().removeHandler(self._handler)
                self._handler.close()
        return report

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self.close(error)


def one_line(error: BaseException) -> str:
    """``Type: message``, the message's first line only (the type alone when it has none)."""
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def save_traceback(error: BaseException, work: str | os.PathLike | None) -> Path | None:
    """Write the traceback of ``error`` to ``<work>/runs/error-<time>-<pid>.txt`` (or to the
    temporary folder, where the work folder cannot take it); return the file, or None when
    nothing could be written."""
    text = "".join(traceback.format_exception(error))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    folders = ([Path(work) / "runs"] if work is not None else []) + [Path(tempfile.gettempdir())]
    for folder in folders:
        with contextlib.suppress(OSError):
            return write_text(folder / name, text)
    return None


def start_run(work_dir: str | os.PathLike, stage: str) -> RunLog:
    """Open the log folder of one run of ``stage`` under ``<work_dir>/runs``."""
    setup_console()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(work_dir) / "runs" / f"{stamp}-{stage}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    handler = RunFileHandler(folder / "run.log")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    logger = logging.getLogger(stage)
    logger.info("run folder %s", folder)
    return RunLog(stage=stage, folder=folder, logger=logger, _handler=handler)
