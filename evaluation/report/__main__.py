from common.cli import run_module

run_module("evaluation.report")
