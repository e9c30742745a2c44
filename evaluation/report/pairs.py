"""Pairs to look at: reads predictions, features.csv, feature stores; writes their JPEGs."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.isc_metric import GroundTruth, Predictions
from evaluation.report.record import LOCAL_LIKE, ordered_branches

log = logging.getLogger(__name__)

N_PAIRS = 12  # pictures per list of pairs to look at (two lists)
THRESHOLD = 0.5  # without ground truth: the sample is drawn around this (calibrated) score
MAX_TABLE_ROWS = 50_000  # predictions in the page's table: best per query first
PER_QUERY = 3  # predictions per query in that table
THUMB_WIDTH = 480
JPEG_QUALITY = 85


@dataclass
class PairItem:
    """One pair to look at: its figures, evidence and picture."""

    group: str
    query_id: str
    reference_id: str
    score: float | None
    label: int  # 1 copy, 0 non-copy, -1 unknown
    rank: int | None  # rank of the reference among the query's predictions
    evidence: list[tuple[str, str]] = field(default_factory=list)
    picture: str | None = None
    thumb: str | None = None
    caption: str = ""
    note: str = ""


def query_ranks(pred: Predictions) -> np.ndarray:
    """Rank (1 = best) of each prediction among its query's, by score then reference id."""
    ranks = np.empty(len(pred), np.int64)
    if not len(pred):
        return ranks
    order = np.lexsort((pred.reference_ids, -pred.scores, pred.query_ids))
    q = pred.query_ids[order]
    new = np.r_[True, q[1:] != q[:-1]]
    first = np.flatnonzero(new)[np.cumsum(new) - 1]  # position of each row's query's best
    ranks[order] = np.arange(len(q)) - first + 1
    return ranks


def pick_pairs(pred: Predictions, ranks: np.ndarray, labels: np.ndarray | None,
               gt: GroundTruth | None) -> list[PairItem]:
    """The pairs to look at (package docstring), ``N_PAIRS`` per list."""
    by_score = np.lexsort((pred.reference_ids, pred.query_ids, -pred.scores))

    def item(group: str, i: int) -> PairItem:
        label = -1 if labels is None else int(labels[i])
        return PairItem(group, str(pred.query_ids[i]), str(pred.reference_ids[i]),
                        float(pred.scores[i]), label, int(ranks[i]))

    if gt is not None and labels is not None:
        false = [i for i in by_score if labels[i] == 0][:N_PAIRS]
        at = {(q, r): i for i, (q, r) in enumerate(zip(pred.query_ids.tolist(),
                                                        pred.reference_ids.tolist(),
                                                        strict=True))}
        copies = sorted(gt.positives, key=lambda p: (p in at, pred.scores[at[p]]
                                                     if p in at else 0.0, p))[:N_PAIRS]
        items = [item("highest-scoring non-copies", i) for i in false]
        for q, r in copies:
            if (q, r) in at:
                items.append(item("missed or lowest-scoring copies", at[(q, r)]))
            else:
                items.append(PairItem("missed or lowest-scoring copies", q, r, None, 1, None,
                                      note="missed: not in the submission"))
        return items
    top = [int(i) for i in by_score[:N_PAIRS]]
    near = np.argsort(np.abs(pred.scores - THRESHOLD), kind="stable")
    shown = set(top)
    around = [int(i) for i in near if int(i) not in shown][:N_PAIRS]
    around.sort(key=lambda i: (-pred.scores[i], pred.query_ids[i], pred.reference_ids[i]))
    return ([item("top pairs", i) for i in top]
            + [item(f"around the score {THRESHOLD:g}", i) for i in around])


def read_features(path: Path | None, wanted: set[tuple[str, str]],
                  found_for: set[tuple[str, str]]) -> tuple[
                      list[str], dict[tuple[str, str], dict[str, str]], dict[tuple[str, str], str]]:
    """One pass over features.csv: the columns, the rows of ``wanted`` pairs, and the
    ``found_by`` of the ``found_for`` pairs."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    found: dict[tuple[str, str], str] = {}
    if path is None:
        return [], rows, found
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c for c in reader.fieldnames or [] if c not in ("query_id",
                                                                          "reference_id")]
            for row in reader:
                pair = (row.get("query_id", ""), row.get("reference_id", ""))
                if pair in wanted:
                    rows[pair] = row
                if pair in found_for:
                    found[pair] = row.get("found_by") or ""
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        log.warning("features %s not read (%s)", path, e)
        return [], {}, {}
    return columns, rows, found


def query_boxes(entry: dict[str, str]) -> dict[str, Any]:
    """The detector's boxes of a local branch's queries (its frames), from the ``inputs.json``
    beside its pairs; none where it was verified without."""
    from common.io import read_inputs
    from match_score.frames import content_boxes

    try:
        return content_boxes(read_inputs(entry["pairs"]).get("query_boxes")) if entry.get(
            "pairs") else {}
    except Exception as e:  # a picture is a courtesy: never fail the page for it
        log.warning("boxes of %s not read (%s)", entry.get("pairs"), e)
        return {}


class Drawer:
    """Pictures of pairs from the local-like branches' feature stores (the best verified
    view of any of them), with the overlap outlined."""

    def __init__(self, record: dict[str, Any]):
        self.conf = record["config"]
        self.sources = []
        for name, entry in ordered_branches(record):
            if all(entry.get(k) for k in LOCAL_LIKE) and all(
                    (Path(entry[k]) / "manifest.json").exists() for k in LOCAL_LIKE):
                self.sources.append((name, Path(entry["query_store"]),
                                     Path(entry["reference_store"]), query_boxes(entry)))
        self._features: dict[Path, Any] = {}

    def _open(self, root: Path) -> Any:
        from local_fea.features import LocalFeatures

        if root not in self._features:
            self._features[root] = LocalFeatures(root)
        return self._features[root]

    def draw(self, query_id: str, ref_id: str, caption_head: str) -> tuple[np.ndarray | None,
                                                                            str]:
        """The picture of a pair (or None) and a note on how it was made."""
        from match_score.geometry import Verification
        from match_score.visualize import draw, figures_line, verify_views

        best = None
        paths = None
        for name, q_root, r_root, boxes in self.sources:
            try:
                qf, rf = self._open(q_root), self._open(r_root)
                if query_id not in qf.store or ref_id not in rf.store:
                    continue
                paths = paths or (qf.store.source_path(query_id), rf.store.source_path(ref_id))
                for view, result in verify_views(self.conf, qf, rf, query_id, ref_id,
                                                 (boxes.get(query_id), None)).items():
                    if best is None or result.inliers > best[0].inliers:
                        best = (result, view, name, qf.store.source_path(query_id),
                                rf.store.source_path(ref_id))
            except Exception as e:  # a picture is a courtesy: never fail the page for it
                log.warning("%s %s-%s: not verified (%s)", name, query_id, ref_id, e)
        if best is None and paths is None:
            return None, "not drawn: no local feature store holds this pair"
        if best is None:
            best = (Verification(), "orig", "", *paths)
        result, view, name, q_path, r_path = best
        caption = (f"{caption_head}   [{name or 'no matches'}, {view} view]\n"
                   f"{figures_line(result)}")
        try:
            return draw(q_path, r_path, result, view == "mirror", caption), (
                f"{name} branch, {view} view" if name else "")
        except Exception as e:
            log.warning("%s-%s: not drawn (%s)", query_id, ref_id, e)
            return None, f"not drawn: {e}"


def _write_jpeg(path: Path, bgr: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    path.write_bytes(data.tobytes())


def draw_pairs(items: list[PairItem], record: dict[str, Any], folder: Path) -> None:
    """Write each pair's picture and thumbnail into ``folder``."""
    import cv2

    drawer = Drawer(record)
    for n, it in enumerate(items, 1):
        score = "missed" if it.score is None else f"score {it.score:.4g}"
        picture, how = drawer.draw(it.query_id, it.reference_id,
                                   f"{it.query_id} vs {it.reference_id}: {score}")
        if picture is None:
            it.note = "; ".join(x for x in (it.note, how) if x)
            continue
        it.picture, it.thumb, it.caption = f"pair-{n:02d}.jpg", f"pair-{n:02d}-thumb.jpg", how
        _write_jpeg(folder / it.picture, picture)
        h, w = picture.shape[:2]
        width = min(THUMB_WIDTH, w)
        thumb = cv2.resize(picture, (width, max(1, round(h * width / w))),
                           interpolation=cv2.INTER_AREA)
        _write_jpeg(folder / it.thumb, thumb)


def table_rows(pred: Predictions, ranks: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Indices of the predictions in the page's table: the best ``PER_QUERY`` of each query,
    best-ranked first up to ``MAX_TABLE_ROWS``, then by score."""
    keep = np.flatnonzero(ranks <= PER_QUERY)
    keep = keep[np.lexsort((-pred.scores[keep], ranks[keep]))][:MAX_TABLE_ROWS]
    return keep[np.lexsort((pred.reference_ids[keep], pred.query_ids[keep],
                            -pred.scores[keep]))]
