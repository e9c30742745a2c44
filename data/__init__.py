"""Bundled demo benchmark (CC0 / public-domain photos) and the tool that builds such sets.

See ``data/make_benchmark.py`` for the layout and the exact command that rebuilt this folder,
and ``data/LICENSE.txt`` for where the photos come from.
"""
