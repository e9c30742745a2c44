"""The branches the fusion knows, registered by name, and the evidence each gives per pair.

A ``Branch`` says where its pairs file is, which fusion features it gives a (query,
reference) pair it found, which features a pair it did not find gets, and how to compute its
evidence for pairs other branches found (``fill``), when that is possible:

- ``local``: RootSIFT search + verification (``match_score.verify``'s ``pairs.csv``). Its
  feature is the logit of the calibrated local score of the pair's best view. Pairs only
  other branches found are verified on demand (both query views), for pairs another branch
  ranks within ``merge.fill_rank`` of its query: the expensive fill.
- ``global``: the global descriptor's top-k (``global_fea.search``'s ``pairs.csv``); its
  features are the raw and the normalised similarity. Every other pair gets them from the
  stored descriptors (a dot product): the cheap fill.
- ``crop_local``: the local branch on the overlay detector's crops of the queries
  (``preprocess.crop_local``'s ``pairs.csv``: the local columns, original query ids), made
  by ``local_like``; a query without a crop has no evidence here (``LOGIT_FLOOR``). Pairs
  other branches rank high are verified with the crop's features. Any other branch with the
  local columns plugs in the same way: ``register(local_like(name, locate, fill))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError
from common.config import REPO_ROOT, digest
from common.io import read_csv

Pair = tuple[str, str]
LOGIT_FLOOR = -12.0  # local evidence of a pair without inliers, or never verified


@dataclass(frozen=True)
class Context:
    """The run the evidence is gathered for."""

    conf: dict[str, Any]
    queries: Path | None
    references: Path | None
    work_dir: Path
    folder: Path  # where fills write their resumable outputs


@dataclass
class Evidence:
    """One branch's features of the pairs it has evidence for, and its own score of them."""

    features: dict[Pair, np.ndarray] = field(default_factory=dict)
    scores: dict[Pair, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Branch:
    name: str
    features: tuple[str, ...]
    locate: Callable[[Context], Path]
    read: Callable[[Context, Path], Evidence]
    missing: tuple[float, ...]  # features of a pair the branch has no evidence for
    fill: Callable[[Context, list[Pair]], Evidence] | None = None
    fill_all: bool = False  # fill every candidate (cheap), not only the top-ranked ones


BRANCHES: dict[str, Branch] = {}


def register(branch: Branch) -> Branch:
    BRANCHES[branch.name] = branch
    return branch


def selected(names: Sequence[str]) -> list[Branch]:
    unknown = [n for n in names if n not in BRANCHES]
    if unknown:
        raise UserError(f"merge.branches: unknown branch(es) {unknown} (known: "
                        f"{sorted(BRANCHES)})")
    return [BRANCHES[n] for n in names]


# ---------------------------------------------------------------- local-like branches


def local_evidence(rows: list[dict[str, str]], conf: dict[str, Any]) -> Evidence:
    """The best verified view of each pair: its calibrated score and that score's logit
    (``LOGIT_FLOOR`` without inliers)."""
    from match_score.score import ScoreModel

    model = ScoreModel.load(REPO_ROOT / conf["match_score"]["score_model"])
    evidence = Evidence()
    if not rows:
        return evidence
    logits = model.logit(rows)
    probs = model.predict(rows)
    for row, logit, prob in zip(rows, logits, probs, strict=True):
        pair = (row["query_id"], row["reference_id"])
        value = max(float(logit), LOGIT_FLOOR) if int(row["inliers"]) > 0 else LOGIT_FLOOR
        if pair not in evidence.scores or prob > evidence.scores[pair] or (
                prob == evidence.scores[pair] and value > evidence.features[pair][0]):
            evidence.scores[pair] = float(prob)
            evidence.features[pair] = np.array([value])
    return evidence


def read_local(ctx: Context, path: Path) -> Evidence:
    return local_evidence(read_csv(path), ctx.conf)


def locate_local(ctx: Context) -> Path:
    from local_fea.extract import store_for
    from local_fea.search import candidates_path
    from match_score import verify

    q_store = store_for(ctx.conf, ctx.queries, ctx.work_dir)
    r_store = store_for(ctx.conf, ctx.references, ctx.work_dir)
    return verify.pairs_path(ctx.conf, candidates_path(ctx.conf, q_store, r_store, ctx.work_dir),
                             ctx.work_dir)


def verify_fill(ctx: Context, pairs: list[Pair], q_store: Path, name: str) -> Evidence:
    """Verify ``pairs`` (every query view) with the local features of ``q_store``; pairs of
    queries the store does not hold are left without evidence."""
    from local_fea.extract import store_for
    from local_fea.features import LocalFeatures
    from match_score.verify import verify_pairs

    queries = LocalFeatures(q_store)
    pairs = [p for p in pairs if p[0] in queries.store]
    if not pairs:
        return Evidence()
    r_store = store_for(ctx.conf, ctx.references, ctx.work_dir)
    todo = sorted((q, r, v, "") for q, r in pairs for v in queries.views())
    out = ctx.folder / f"{name}_fill-{digest(todo)}" / "parts"
    rows = verify_pairs(ctx.conf, todo, q_store, r_store, out, desc=f"verify ({name} fill)")
    return local_evidence(rows, ctx.conf)


def fill_local(ctx: Context, pairs: list[Pair]) -> Evidence:
    from local_fea.extract import store_for

    return verify_fill(ctx, pairs, store_for(ctx.conf, ctx.queries, ctx.work_dir), "local")


def local_like(name: str, locate: Callable[[Context], Path],
               fill: Callable[[Context, list[Pair]], Evidence] | None = None) -> Branch:
    """A branch whose pairs file has the local branch's columns (e.g. local on query crops)."""
    return Branch(name, (f"{name}_logit",), locate, read_local, (LOGIT_FLOOR,), fill)


# ---------------------------------------------------------------- global branch


def locate_global(ctx: Context) -> Path:
    from global_fea import search

    return search.pairs_path(ctx.conf, global_h5(ctx), ctx.work_dir)


def global_h5(ctx: Context) -> Path:
    from global_fea import search

    return search.locate_h5(ctx.conf, ctx.queries, ctx.references, ctx.work_dir)


GLOBAL_MISSING = (0.0, -0.2)  # a pair with an unreadable image: a poor global match


def read_global(ctx: Context, path: Path) -> Evidence:
    evidence = Evidence()
    for row in read_csv(path):
        pair = (row["query_id"], row["reference_id"])
        evidence.features[pair] = np.array([float(row["similarity"]),
                                            float(row["norm_similarity"])])
        evidence.scores[pair] = float(row["score"])
    return evidence


def fill_global(ctx: Context, pairs: list[Pair]) -> Evidence:
    """Global similarities of ``pairs`` from the stored descriptors."""
    from global_fea.search import GlobalScorer

    evidence = Evidence()
    if not pairs:
        return evidence
    sims, norms = GlobalScorer(ctx.conf, global_h5(ctx)).score(pairs)
    for pair, sim, norm in zip(pairs, sims, norms, strict=True):
        if np.isfinite(sim):
            evidence.features[pair] = np.array([float(sim), float(norm)])
            evidence.scores[pair] = float(norm)
    return evidence


register(Branch("local", ("local_logit",), locate_local, read_local, (LOGIT_FLOOR,),
                fill_local))
def locate_crop_local(ctx: Context) -> Path:
    from preprocess import crop_local

    return crop_local.pairs_path(ctx.conf, ctx.queries, ctx.references, ctx.work_dir)


def fill_crop_local(ctx: Context, pairs: list[Pair]) -> Evidence:
    """Verify the crops of the queries that have one against ``pairs``' references."""
    from preprocess import crop_local

    q_store = crop_local.query_store(ctx.conf, ctx.queries, ctx.work_dir)
    return verify_fill(ctx, pairs, q_store, "crop_local") if q_store.is_dir() else Evidence()


register(Branch("global", ("global_sim", "global_norm"), locate_global, read_global,
                GLOBAL_MISSING, fill_global, fill_all=True))
register(local_like("crop_local", locate_crop_local, fill_crop_local))
