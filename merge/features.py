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


def query_gaps(pairs: Sequence[Pair], values: np.ndarray) -> np.ndarray:
    """Each pair's value less the best value among the pairs of its query (<= 0)."""
    best: dict[str, float] = defaultdict(lambda: -np.inf)
    for (query, _), value in zip(pairs, values, strict=True):
        best[query] = max(best[query], float(value))
    return values - np.array([best[q] for q, _ in pairs], np.float64)


@dataclass
class PairTable:
    """Candidate pairs (sorted), their feature matrix and which branches found each."""

    pairs: list[Pair]
    features: list[str]
    x: np.ndarray
    found_by: list[str]


def top_ranked(evidence: Evidence, max_rank: int) -> set[Pair]:
    """Pairs within the ``max_rank`` best of their query by the branch's own score."""
    by_query: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (q, r), score in evidence.scores.items():
        by_query[q].append((score, r))
    top = set()
    for q, scored in by_query.items():
        top.update((q, r) for _, r in sorted(scored, key=lambda t: (-t[0], t[1]))[:max_rank])
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
           pair_files: Mapping[str, Path], folder: Path, drop_self: bool = False) -> PairTable:
    """The candidate pairs of all branches with every branch's features (module docstring);
    fills write their resumable work under ``folder``."""
    evidence = read_branches(conf, branches, pair_files, drop_self)
    pairs = sorted(set().union(*(e.features for e in evidence.values())))
    found_by = ["+".join(b.name for b in branches if p in evidence[b.name].features)
                for p in pairs]
    max_rank = conf["merge"]["fill_rank"]
    top = set().union(*(top_ranked(e, max_rank) for e in evidence.values()))
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
            columns.append(query_gaps(pairs, columns[-1][:, 0]).reshape(len(pairs), 1))
    names = feature_names(branches)
    x = np.hstack(columns) if pairs else np.zeros((0, len(names)))
    return PairTable(pairs, names, x, found_by)
