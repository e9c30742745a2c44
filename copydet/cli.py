"""copydet: the copy-detection pipeline, one subcommand per stage.

    copydet run --queries data/queryimages --references data/referenceimages --out sub.csv
    copydet extract --images data/referenceimages        # prints the feature store
    copydet search --queries <store> --references <store>  # prints candidates.csv

Each subcommand is the ``COMMAND`` of its module (``python -m <module>`` runs the same); each
prints the path it wrote, which the next stage takes. This table is the top of the package:
it imports every command, and nothing imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import calibration.dedupe
import calibration.fusion
import calibration.pair_net
import calibration.score
import evaluation.report
import global_fea.extract
import global_fea.search
import global_fea.whiten
import local_fea.extract
import local_fea.search
import local_fea.train_index
import match_score.verify
import match_score.visualize
import merge.fuse
import pipeline
import pipeline.dedupe
import preprocess.detect
import preprocess.evaluate
from common.cli import Command, run_command

COMMANDS: tuple[Command, ...] = (
    pipeline.COMMAND, pipeline.dedupe.COMMAND,
    local_fea.extract.COMMAND, local_fea.search.COMMAND, match_score.verify.COMMAND,
    preprocess.detect.COMMAND,
    global_fea.extract.COMMAND, global_fea.search.COMMAND,
    merge.fuse.COMMAND,
    match_score.visualize.COMMAND,
    local_fea.train_index.COMMAND, calibration.score.COMMAND, global_fea.whiten.COMMAND,
    calibration.fusion.COMMAND, calibration.pair_net.COMMAND, calibration.dedupe.COMMAND,
    preprocess.evaluate.COMMAND,
    evaluation.report.COMMAND,
)


def commands() -> dict[str, Command]:
    return {c.name: c for c in COMMANDS}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="copydet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    table = commands()
    for name, command in table.items():
        command.configure(sub.add_parser(name, help=command.summary,
                                         description=command.summary))
    args = parser.parse_args(argv)
    run_command(table[args.command], args)
