"""One candidate set from every branch's pairs, with every branch's features for each pair.

The candidates are the union of the pairs the branches found (less the pairs of an image with
itself when the queries are the references: ``drop_self``). Each pair then gets the
features of every branch: the branch's own when it found the pair, else computed (``fill``)
when the branch can: always for a cheap fill (global similarity), and for an expensive one
(verification) only when another branch ranks the pair within ``merge.fill_rank`` of its
query. What is still missing gets the branch's ``missing`` values (no evidence).

A branch declared with ``gap`` also gives each pair the gap between its first feature and
the best of that feature among the pairs of the same query (0 for the query's best pair). A
query that is a copy of one reference often also matches that reference's look-alikes
(other photos of the same setting) with weaker evidence: the gap tells them apart. The
matching track allows such a use of the other candidates of a query.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError
from merge.branches import BranchEvidence
from merge.evidence import Evidence, Pair

log = logging.getLogger(__name__)


def feature_names(branches: Sequence[BranchEvidence]) -> list[str]:
    """The fusion's features of ``branches``, in the order of the candidate table."""
    return [f for b in branches for f in (*b.features, *((f"{b.features[0]}_gap",) if b.gap
                                                          else ()))]


def ends(pair: Pair, unordered: bool) -> tuple[str, ...]:
    """The images a pair's gap and rank are taken over: its query, or both (unordered)."""
    return pair if unordered else pair[:1]


def query_gaps(pairs: Sequence[Pair], values: np.ndarray, unordered: bool = False) -> np.ndarray:
    """Each pair's value less the best value among the pairs of its query (<= 0); of
    ``unordered`` pairs (one folder deduplicated), the best among the pairs of either image."""
    best: dict[str, float] = defaultdict(lambda: -np.inf)
    for pair, value in zip(pairs, values, strict=True):
        for image in ends(pair, unordered):
            best[image] = max(best[image], float(value))
    return values - np.array([max(best[i] for i in ends(p, unordered)) for p in pairs],
                             np.float64)


@dataclass
class PairTable:
    """Candidate pairs (sorted), their feature matrix and which branches found each."""

    pairs: list[Pair]
    features: list[str]
    x: np.ndarray
    found_by: list[str]


def top_ranked(evidence: Evidence, max_rank: int, unordered: bool = False) -> set[Pair]:
    """Pairs within the ``max_rank`` best of their query (of either image, ``unordered``) by
    the branch's own score."""
    by_image: dict[str, list[tuple[float, Pair]]] = defaultdict(list)
    for pair, score in evidence.scores.items():
        for image in ends(pair, unordered):
            by_image[image].append((score, pair))
    top = set()
    for scored in by_image.values():
        top.update(p for _, p in sorted(scored, key=lambda t: (-t[0], t[1]))[:max_rank])
    return top


def without_self_pairs(evidence: Evidence) -> Evidence:
    """``evidence`` less the pairs of an image with itself (queries and references are one
    image set: each query's copies are among the other images)."""
    return Evidence({p: f for p, f in evidence.features.items() if p[0] != p[1]},
                    {p: s for p, s in evidence.scores.items() if p[0] != p[1]})


def read_branches(conf: dict[str, Any], branches: Sequence[BranchEvidence],
                  pair_files: Mapping[str, Path], drop_self: bool = False) -> dict[str, Evidence]:
    """Each branch's evidence from its pairs file (without self-pairs with ``drop_self``)."""
    evidence = {}
    for branch in branches:
        path = pair_files.get(branch.name)
        if path is None or not Path(path).exists():
            raise UserError(f"no pairs of the {branch.name} branch{f' at {path}' if path else ''}"
                            ": run that branch first, or leave it out of merge.branches")
        evidence[branch.name] = branch.read(conf, Path(path))
        if drop_self:
            evidence[branch.name] = without_self_pairs(evidence[branch.name])
        log.info("%s: %d pairs from %s", branch.name, len(evidence[branch.name].features), path)
    return evidence


def gather(conf: dict[str, Any], branches: Sequence[BranchEvidence],
           pair_files: Mapping[str, Path], folder: Path, drop_self: bool = False,
           unordered: bool = False) -> PairTable:
    """The candidate pairs of all branches with every branch's features (module docstring);
    fills write their resumable work under ``folder``. ``unordered``: each pair is one
    unordered pair of one folder (``copydet dedupe``), ranks and gaps are over both images."""
    evidence = read_branches(conf, branches, pair_files, drop_self)
    pairs = sorted(set().union(*(e.features for e in evidence.values())))
    found_by = ["+".join(b.name for b in branches if p in evidence[b.name].features)
                for p in pairs]
    max_rank = conf["merge"]["fill_rank"]
    top = set().union(*(top_ranked(e, max_rank, unordered) for e in evidence.values()))
    for branch in branches:
        own = evidence[branch.name]
        missing = [p for p in pairs if p not in own.features]
        if branch.fill is None or not missing:
            continue
        todo = missing if branch.fill_all else [p for p in missing if p in top]
        filled = branch.fill(conf, Path(pair_files[branch.name]), todo, folder, branch.name)
        own.features.update(filled.features)
        log.info("%s: evidence computed for %d of the %d pairs it did not find", branch.name,
                 len(filled.features), len(missing))
    columns = []
    for branch in branches:
        own, default = evidence[branch.name].features, np.array(branch.missing, np.float64)
        columns.append(np.array([own.get(p, default) for p in pairs], np.float64)
                       .reshape(len(pairs), len(branch.features)))
        if branch.gap:
            columns.append(query_gaps(pairs, columns[-1][:, 0], unordered).reshape(len(pairs), 1))
    names = feature_names(branches)
    x = np.hstack(columns) if pairs else np.zeros((0, len(names)))
    return PairTable(pairs, names, x, found_by)
