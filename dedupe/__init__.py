"""Deduplication of one collection (``copydet dedupe``): the stage logic below the pipeline.

``dedupe.pairs`` turns the directed results of the branches (every image a query and a
reference) into unordered pairs, each once; ``dedupe.groups`` groups the pairs above the
operating threshold, picks the image to keep in each group and writes the outputs
(``pairs.csv``, ``groups.csv``, ``duplicates.json``, ``keep.txt``, ``remove.txt``). The
chaining lives in ``pipeline.dedupe``.
"""
