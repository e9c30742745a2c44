"""copydet: the copy-detection pipeline, one subcommand per stage.

    copydet run --queries data/queryimages --references data/referenceimages --out sub.csv
    copydet extract --images data/referenceimages        # prints the feature store
    copydet search --queries <store> --references <store>  # prints candidates.csv

Each subcommand is the ``COMMAND`` of its stage module (``python -m <module>`` runs the same);
each prints the path it wrote, which the next stage takes.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from common.cli import Command, run_command

MODULES = (
    "pipeline",
    "local_fea.extract", "local_fea.search", "match_score.verify",
    "preprocess.detect",
    "global_fea.extract", "global_fea.search",
    "merge.fuse",
    "match_score.visualize",
    "local_fea.train_index", "match_score.calibrate", "global_fea.whiten", "merge.calibrate",
    "preprocess.evaluate",
    "evaluation.report",
)


def commands() -> dict[str, Command]:
    found = [importlib.import_module(m).COMMAND for m in MODULES]
    return {c.name: c for c in found}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="copydet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    table = commands()
    for name, command in table.items():
        command.configure(sub.add_parser(name, help=command.summary,
                                         description=command.summary))
    args = parser.parse_args(argv)
    run_command(table[args.command], args)
