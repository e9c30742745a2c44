"""Command-line arguments every stage shares: work folder, configuration file, overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import UserError
from common.config import load_config


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--work", type=Path, default=Path("work"),
                       help="work folder for all outputs (default: work)")
    group.add_argument("--config", type=Path, help="YAML file overriding config.yaml")
    group.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. -o local_fea.short_side=400")
    group.add_argument("--n-jobs", type=int, help="worker processes (default: run.n_jobs)")


def add_set_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--queries`` and ``--references``: image folders, or the feature stores made of them."""
    parser.add_argument("--queries", required=required, type=Path,
                        help="query images (or their feature store)")
    parser.add_argument("--references", required=required, type=Path,
                        help="reference images (or their feature store)")


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = list(args.override)
    if args.n_jobs is not None:
        overrides.append(f"run.n_jobs={args.n_jobs}")
    return load_config(args.config, overrides)


def run_main(main, *args, **kwargs):
    """Run a stage's ``main``; a user error becomes a one-line message and exit status 2."""
    try:
        result = main(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is not None:
        print(result)
    return result
