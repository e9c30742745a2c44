"""Unordered pairs: a folder searched against itself finds a pair from both ends; here each
unordered pair ``{a, b}`` becomes one row with ``a < b``, before anything costly is done with
it (verification) and before the fusion (which then scores it once).

Two different pictures in one frame (a meme's captions, an app's screenshot bar) match by
the frame alone: ``frame_gate`` gives a pair of two framed images whose crops match nothing
in the other image the score of that crop evidence.

Two copies of one photo may share nothing (two crops of opposite corners, a copy blended
into another picture): ``two_hop`` scores such a pair through an image both are copies of.

A candidate proposed by view ``v`` of ``b`` for ``a`` is verified as view ``v`` of ``a``
against ``b``: the mirror of ``b`` against ``a`` is the mirror of ``a`` against ``b``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import read_csv, read_inputs, write_csv, write_inputs, write_text
from dedupe.groups import links

UNORDERED = "unordered"  # suffix of the folder of a file made unordered


def key(a: str, b: str) -> tuple[str, str]:
    """The unordered pair of ``a`` and ``b``, smaller id first."""
    return (a, b) if a <= b else (b, a)


def unordered_path(ordered: Path, variant: str = "") -> Path:
    """Where the unordered form of ``<folder>/<file>`` goes: ``<folder>-unordered/<file>``
    (``<folder>-unordered-<variant>/<file>`` for a variant of it)."""
    name = "-".join(filter(None, [ordered.parent.name, UNORDERED, variant]))
    return ordered.parent.with_name(name) / ordered.name


def best_rows(rows: Iterable[dict[str, str]], value: str, query: str = "query_id",
              reference: str = "reference_id", extra: Sequence[str] = ()) -> list[dict]:
    """The row of highest ``value`` for each unordered pair (and each value of the columns
    ``extra``), ids put in ``key`` order; the pairs of an image with itself are left out."""
    best: dict[tuple, dict[str, str]] = {}
    for row in rows:
        if row[query] == row[reference]:
            continue
        a, b = key(row[query], row[reference])
        k = (a, b, *(row[c] for c in extra))
        if k not in best or float(row[value]) > float(best[k][value]):
            best[k] = {**row, query: a, reference: b}
    return [best[k] for k in sorted(best)]


def best_per_query(rows: Iterable[dict[str, str]], value: str, n: int,
                   query: str = "query_id", reference: str = "reference_id") -> list[dict]:
    """The ``n`` rows of highest ``value`` of each query (over all its views), ties by
    reference id; rows of an image with itself do not count."""
    by_query: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if row[query] != row[reference]:
            by_query[row[query]].append(row)
    return [row for q in sorted(by_query) for row in
            sorted(by_query[q], key=lambda r: (-float(r[value]), r[reference]))[:n]]


def unordered_file(ordered: Path, value: str, extra: Sequence[str] = (),
                   per_query: int = 0) -> Path:
    """``ordered`` (a CSV of query/reference rows) with one row per unordered pair (the best
    by ``value``), beside it; its ``inputs.json`` is carried over. With ``per_query``, only
    the best ``per_query`` rows of each query (``best_per_query``) are taken. Made once per
    content of ``ordered`` (written atomically, so a killed run makes it again)."""
    out = unordered_path(ordered, f"top{per_query}" if per_query else "")
    stamp = out.with_name("source.sha1")
    source = hashlib.sha1(ordered.read_bytes()).hexdigest()
    if out.exists() and stamp.exists() and stamp.read_text() == source:
        return out
    rows = read_csv(ordered)
    header = list(rows[0]) if rows else _header(ordered)
    if per_query:
        rows = best_per_query(rows, value, per_query)
    write_csv(out, header, [[r[c] for c in header] for r in best_rows(rows, value, extra=extra)])
    if ordered.with_name("inputs.json").exists():
        write_inputs(out, **read_inputs(ordered))
    write_text(stamp, source)  # written last: the content of ``ordered`` it was made from
    return out


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return f.readline().strip().split(",")


def unordered_candidates(candidates: Path, per_image: int = 0) -> Path:
    """``local_fea.search``'s candidates of a store against itself, one row per unordered
    pair and view (the most votes), for ``match_score.verify``; with ``per_image``, each
    image's best that many over both its views (a photo with no copy fills its mirror
    view's list with chance neighbours, and a flipped copy tops the mirror view)."""
    return unordered_file(candidates, "votes", extra=("view",), per_query=per_image)


def identical_files(ids: Sequence[str], paths: Sequence[Path]) -> list[tuple[str, str]]:
    """Pairs of byte-identical files: each such file with the first (smallest id) of its
    kind, so identical files are one group even where no branch can describe them."""
    sizes: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for image, path in sorted(zip(ids, paths, strict=True)):
        with contextlib.suppress(OSError):  # unreadable: the stages that read it report it
            sizes[path.stat().st_size].append((image, path))
    first: dict[str, str] = {}
    pairs = []
    for image, path in sorted(i for same in sizes.values() if len(same) > 1 for i in same):
        try:  # only files of a size that occurs twice are read
            with open(path, "rb") as f:
                content = hashlib.file_digest(f, "sha1").hexdigest()
        except OSError:
            continue
        if content in first:
            pairs.append((first[content], image))
        else:
            first[content] = image
    return pairs


def two_hop(scores: Mapping[tuple[str, str], float], floor: float = 0.01,
            fan: int = 50) -> dict[tuple[str, str], float]:
    """Pairs that are copies of one image ``c`` and score more through it than by themselves:
    ``min(s(a, c), s(c, b))``, the weaker of the two links (so a look-alike linked weakly to
    a group scores no more than that link). Links under ``floor`` are left out, and each
    image lends only its ``fan`` best links (a logo in a thousand pictures costs 50**2)."""
    linked = links(((a, b, s) for (a, b), s in scores.items()), floor)
    found: dict[tuple[str, str], float] = {}
    for neighbours in linked.values():
        best = sorted(neighbours.items(), key=lambda t: (-t[1], t[0]))[:fan]
        for i, (a, sa) in enumerate(best):
            for b, sb in best[i + 1:]:
                pair, s = key(a, b), min(sa, sb)
                if s > max(scores.get(pair, 0.0), found.get(pair, 0.0)):
                    found[pair] = s
    return found


def frame_gate(table: Any, scores: np.ndarray, framed: set[str],
               feature: str = "crop_local_logit", floor: float = -12.0) -> np.ndarray:
    """``scores`` of a fusion table (``merge.features.PairTable``) with every pair of two
    ``framed`` images (the overlay detector found a picture in each) whose crop evidence is
    at its ``floor`` (no crop of one verified in the other) set to that evidence's
    probability: what they share is the frame."""
    if feature not in table.features or not len(scores):
        return scores
    crop = table.x[:, table.features.index(feature)]
    both = np.array([a in framed and b in framed for a, b in table.pairs], bool)
    gate = both & (crop <= floor)
    return np.where(gate, np.minimum(scores, 1 / (1 + np.exp(-crop))), scores)
