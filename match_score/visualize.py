"""Draw the verified matches of one (query, reference) pair, to look at a result.

    copydet visualize --query Q00003 --reference R000013 \\
        --queries <query feature store> --references <reference feature store> --out match.png

Both images side by side (the query mirrored when its mirror view matched better), inliers of
the first homography in green, of the second in cyan, rejected matches in faint red, and the
pair's verification figures and calibrated score in the caption; the overlap that the first
homography maps is outlined in orange on both images.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common import UserError, cli
from common.config import REPO_ROOT
from common.images import read_image
from common.io import atomic_path
from local_fea.features import LocalFeatures
from match_score.frames import Box, content_boxes
from match_score.geometry import FIELDS, Verification
from match_score.score import ScoreModel
from match_score.verify import verify_view

HEIGHT = 420
COLOURS = {0: (90, 90, 230), 1: (60, 200, 60), 2: (230, 200, 40)}  # BGR per plane
OVERLAP = (0, 140, 255)  # BGR: outline of the overlap of the first homography


def verify_views(conf: dict[str, Any], qf: LocalFeatures, rf: LocalFeatures, query_id: str,
                 ref_id: str, boxes: tuple[Box | None, Box | None] = (None, None),
                 ) -> dict[str, Verification]:
    """Verification of the pair for every view of the query (``boxes``: the detector's box
    in each image, for its frame: ``match_score.frames``)."""
    return {view: verify_view(qf, rf, query_id, ref_id, view, conf["match_score"],
                              conf["local_fea"]["short_side"], boxes) for view in qf.views()}


def figures_line(result: Verification) -> str:
    """The verification figures of a pair's caption."""
    frame = f" ({result.frame_inliers} on a frame)" if result.frame_inliers else ""
    return (f"{result.matches} matches, {result.inliers_h1}+{result.inliers_h2} inliers{frame}, "
            f"photometric {result.dense_agree:.2f} of {result.dense_cells} cells")


def _panel(path: Path, mirror: bool) -> tuple[np.ndarray, float]:
    rgb, _ = read_image(path, "RGB")
    scale = HEIGHT / rgb.shape[0]
    img = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), HEIGHT))
    img = cv2.cvtColor(img[:, ::-1] if mirror else img, cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(img), scale


def project_border(homography: np.ndarray, width: float, height: float) -> np.ndarray | None:
    """The border of a ``width`` x ``height`` image (pixel-centre coordinates) mapped by
    ``homography``: 4 x 2 corners, or None where the mapping folds it through infinity."""
    corners = np.array([[-0.5, -0.5], [width - 0.5, -0.5], [width - 0.5, height - 0.5],
                        [-0.5, height - 0.5]])
    mapped = np.c_[corners, np.ones(4)] @ np.asarray(homography, np.float64).T
    if not np.all(mapped[:, 2] > 1e-9):
        return None
    xy = mapped[:, :2] / mapped[:, 2:]
    return xy if np.all(np.isfinite(xy)) and np.abs(xy).max() < 1e6 else None


def _outline(panel: np.ndarray, corners: np.ndarray | None, scale: float) -> None:
    """Draw a projected border (full-resolution pixel-centre coordinates) onto a panel."""
    if corners is None:
        return
    pts = np.clip(np.round((corners + 0.5) * scale), -30000, 30000).astype(np.int32)
    cv2.polylines(panel, [pts.reshape(-1, 1, 2)], True, OVERLAP, 2, cv2.LINE_AA)


def draw(query_path: Path, ref_path: Path, result: Verification, mirror: bool,
         caption: str, outline: bool = True) -> np.ndarray:
    """Side-by-side picture of a verified pair; with ``outline``, the overlap of the first
    homography is outlined in orange on both images (each image's border mapped onto the
    other)."""
    left, sq = _panel(query_path, mirror)
    right, sr = _panel(ref_path, False)
    if outline and result.homography is not None:
        q_size = left.shape[1] / sq, left.shape[0] / sq
        r_size = right.shape[1] / sr, right.shape[0] / sr
        _outline(right, project_border(result.homography, *q_size), sr)
        with contextlib.suppress(np.linalg.LinAlgError):
            _outline(left, project_border(np.linalg.inv(result.homography), *r_size), sq)
    canvas = np.full((HEIGHT + 60, left.shape[1] + right.shape[1] + 10, 3), 255, np.uint8)
    canvas[:HEIGHT, :left.shape[1]] = left
    offset = left.shape[1] + 10
    canvas[:HEIGHT, offset:] = right
    if result.points is not None:
        src, dst = result.points
        for plane in (0, 1, 2):  # outliers first, so inliers are drawn on top
            for (x1, y1), (x2, y2) in zip(src[result.plane == plane], dst[result.plane == plane],
                                          strict=True):
                p1 = (round((x1 + 0.5) * sq), round((y1 + 0.5) * sq))
                p2 = (round((x2 + 0.5) * sr) + offset, round((y2 + 0.5) * sr))
                cv2.line(canvas, p1, p2, COLOURS[plane], 1 if plane == 0 else 2, cv2.LINE_AA)
    for i, line in enumerate(caption.splitlines()):
        cv2.putText(canvas, line, (8, HEIGHT + 24 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main(conf: dict[str, Any], query_id: str, ref_id: str, queries: Path, references: Path,
         work_dir: str | Path, out: str | Path | None = None,
         query_boxes: Path | None = None) -> Path:
    """Verify one pair with the query and reference feature stores (and the detector's
    ``boxes.csv`` of the queries, for frames) and write its picture; return the PNG path."""
    qf, rf = LocalFeatures(queries), LocalFeatures(references)
    for image_id, features in ((query_id, qf), (ref_id, rf)):
        if image_id not in features.store:
            raise UserError(f"{image_id!r} is not in {features.store.root}")
    boxes = (content_boxes(query_boxes).get(query_id), None)
    results = verify_views(conf, qf, rf, query_id, ref_id, boxes)
    view, result = max(results.items(), key=lambda kv: kv[1].inliers)
    score = ScoreModel.load(REPO_ROOT / conf["match_score"]["score_model"]).predict(
        [dict(zip(FIELDS, result.row(), strict=True))])[0]
    caption = f"{query_id} ({view} view) vs {ref_id}: score {score:.3f}\n{figures_line(result)}"
    picture = draw(qf.store.source_path(query_id), rf.store.source_path(ref_id), result,
                   view == "mirror", caption)
    out = Path(out or Path(work_dir) / "matches" / f"{query_id}-{ref_id}.png")
    _, png = cv2.imencode(".png", picture)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png.tobytes())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", required=True, help="query id")
    parser.add_argument("--reference", required=True, help="reference id")
    parser.add_argument("--queries", required=True, type=Path, help="query feature store")
    parser.add_argument("--references", required=True, type=Path,
                        help="reference feature store")
    parser.add_argument("--out", type=Path, help="PNG (default: <work>/matches/<q>-<r>.png)")
    parser.add_argument("--query-boxes", type=Path,
                        help="boxes.csv of the queries: inliers on a frame are counted apart")


COMMAND = cli.Command(
    "visualize", __doc__, add_arguments,
    lambda conf, a: main(conf, a.query, a.reference, a.queries, a.references, a.work, a.out,
                         a.query_boxes))

if __name__ == "__main__":
    cli.run_module("match_score.visualize")
