"""Command-line arguments every stage shares: work folder, configuration file, overrides,
worker count and Dask scheduler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import UserError
from common.config import load_config
from common.logs import setup_console
from common.parallel import execution


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


def add_set_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--queries`` and ``--references``: image folders, or the feature stores made of them."""
    parser.add_argument("--queries", required=required, type=Path,
                        help="query images (the local stages also take their feature store)")
    parser.add_argument("--references", required=required, type=Path,
                        help="reference images (the local stages also take their feature store)")


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = list(args.override)
    if args.n_jobs is not None:
        overrides.append(f"run.n_jobs={args.n_jobs}")
    if args.scheduler is not None:
        overrides.append(f"run.scheduler={args.scheduler}")
    return load_config(args.config, overrides)


def run_main(main, conf: Any, *args, **kwargs):
    """Run ``main(conf, ...)`` on the configured executor (local processes, or the Dask
    cluster of ``run.scheduler`` when ``conf`` is a pipeline configuration); a user error
    becomes a one-line message and exit 2."""
    setup_console()
    try:
        with execution(conf.get("run") if isinstance(conf, dict) else None):
            result = main(conf, *args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is not None:
        print(result)
    return result


def run_set_stage(main, doc: str, argv: list[str] | None = None):
    """The whole command line of a stage whose inputs are a query and a reference set:
    ``main(conf, queries, references, work_dir)`` with the common arguments."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_set_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_main(main, config_from_args(args), args.queries, args.references, args.work)


def run_fit_stage(main, doc: str, model_key: str, argv: list[str] | None = None):
    """The whole command line of a calibration: ``main(conf, photos, work_dir, out)`` fits a
    model on training photos and writes it to ``--out`` (default: the ``model_key`` entry)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--photos", required=True, type=Path,
                        help="training photos (never the references of a test set)")
    parser.add_argument("--out", type=Path, help=f"model file (default: {model_key})")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_main(main, config_from_args(args), args.photos, args.work, args.out)
