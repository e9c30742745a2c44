"""Peer deduplication tools, each run by ``bench.bench_dedupe`` in its own virtual
environment (``.peers/<tool>``): every script here is standalone (no project imports) and
writes ``{"pairs": [[a, b, score]], "groups": [[image, ...]]}`` as JSON, ids being file
names."""
