"""Where a pair's evidence lies: on the picture, or on a frame around it.

A query inside a screenshot, meme or pad frame shares the frame's captions, buttons and
borders with every reference that is itself a page, a poster or a text picture. The overlay
detector (``preprocess.detect``) finds the picture inside such a frame: its box, in
``boxes.csv``, where the crop-local branch uses it (``used_for`` holds ``local``). The detector
finds a picture pasted onto a photo just as well, and there the photo around it may be the
copied one. So what surrounds a box is a frame only where it is flat: its ``LEVELS`` most
common grey levels cover ``FLAT_SHARE`` of it; and an inlier outside the box is on that frame
only where those levels fill ``PATCH_SHARE`` of the thumbnail around it (a caption's letters
on their band; not a photo beside a flat pad). Inliers on a frame are no evidence for the
content: verification counts them (``frame_inliers``) and the local score leaves them out
(``match_score.score``); the photometric agreement and the coverage still come from the
homography fitted on all inliers. The figures: ``python -m calibration.frames``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common import UserError
from common.io import read_csv

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in full-resolution pixels
EDGE = 0.02  # keypoints this close to a box's edge (share of its side) describe the content too
LEVELS = 3  # a frame's few grey levels, exact (the thumbnail smooths JPEG noise away)
PATCH = 7  # thumbnail pixels on the side of the neighbourhood of an inlier
# Fitted on training photos (`python -m calibration.frames`), each halfway between the frames'
# 1st and the photos' 99th percentile. The share of a box's surroundings that their levels
# cover: memes 0.70-0.90, screenshots 0.58-0.94, flat pads 0.98-1.0, a photo around a box
# 0.02-0.39 (1st-99th percentile). The share of a keypoint's neighbourhood: on a frame
# 0.08-0.88, median 0.43; on the photo inside it 0 up to the 75th percentile, 0.43 at the 99th.
FLAT_SHARE = 0.50
PATCH_SHARE = 0.26
BOX_COLUMNS = ("query_id", "x1", "y1", "x2", "y2", "used_for")  # of boxes.csv, read here


def content_boxes(boxes: Path | None) -> dict[str, Box]:
    """The boxes of ``boxes.csv`` that the crop-local branch uses, by image id (each file
    version read once per process: the stage names its output by them, every task uses
    them)."""
    if boxes is None:
        return {}
    if not Path(boxes).is_file():
        raise UserError(f"no boxes at {boxes}: give the boxes.csv that `copydet detect` printed")
    stat = Path(boxes).stat()
    return dict(_read_boxes(str(boxes), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_boxes(boxes: str, _size: int, _mtime_ns: int) -> tuple[tuple[str, Box], ...]:
    rows = read_csv(boxes)
    if rows and not set(BOX_COLUMNS) <= set(rows[0]):
        raise UserError(f"{boxes} is not a boxes.csv of `copydet detect` (columns "
                        f"{', '.join(BOX_COLUMNS)})")
    return tuple((r["query_id"], (float(r["x1"]), float(r["y1"]), float(r["x2"]),
                                   float(r["y2"])))
                 for r in rows if "local" in r["used_for"].split("+"))


def outside(shape: tuple[int, int], box: Box, size: tuple[int, int]) -> np.ndarray:
    """Which pixels of a thumbnail of ``shape`` (of an image of full ``size``) lie outside
    ``box``."""
    h, w = shape
    sx, sy = w / size[0], h / size[1]
    mask = np.ones((h, w), bool)
    x1, y1, x2, y2 = box
    mask[max(0, int(y1 * sy)):int(np.ceil(y2 * sy)), max(0, int(x1 * sx)):int(np.ceil(x2 * sx))] = 0
    return mask


def frame_levels(thumb: np.ndarray, box: Box, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The ``LEVELS`` most common grey levels of the grey ``thumb`` outside ``box`` (a mask
    over 0-255) and the share of it they cover (0 when nothing lies outside)."""
    values = thumb[outside(thumb.shape, box, size)]
    levels = np.zeros(256, bool)
    if values.size == 0:
        return levels, 0.0
    levels[np.argsort(np.bincount(values, minlength=256), kind="stable")[-LEVELS:]] = True
    return levels, float(levels[values].mean())


@dataclass(frozen=True)
class Frame:
    """A frame around a detected box: the box, and for every thumbnail pixel the share of its
    neighbourhood in the frame's grey levels."""

    box: Box
    nearby: np.ndarray  # float32, the thumbnail's shape
    size: tuple[int, int]  # the image's full size

    def covers(self, points: np.ndarray) -> np.ndarray:
        """Which ``points`` (n x 2, full-resolution pixels) lie on the frame."""
        return ~inside(points, self.box) & (self.share_at(points) >= PATCH_SHARE)

    def share_at(self, points: np.ndarray) -> np.ndarray:
        """The frame levels' share of the neighbourhood of each of ``points``."""
        h, w = self.nearby.shape
        x = np.clip((points[:, 0] * w / self.size[0]).astype(np.int64), 0, w - 1)
        y = np.clip((points[:, 1] * h / self.size[1]).astype(np.int64), 0, h - 1)
        return self.nearby[y, x]

    def mirrored(self) -> Frame:
        """The frame in the mirror view of its image."""
        x1, y1, x2, y2 = self.box
        width = self.size[0]
        return Frame((width - x2, y1, width - x1, y2), self.nearby[:, ::-1], self.size)


def frame_around(box: Box | None, thumb: np.ndarray, size: tuple[int, int]) -> Frame | None:
    """The frame around ``box`` in an image (its grey ``thumb``, its full ``size``), or None
    where its surroundings are not flat enough for one."""
    if box is None:
        return None
    levels, share = frame_levels(thumb, box, size)
    if share < FLAT_SHARE:
        return None
    return Frame(box, level_share(levels, thumb), size)


def level_share(levels: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """For every pixel of ``thumb``, the share of its ``PATCH`` x ``PATCH`` neighbourhood in
    ``levels`` (a mask over 0-255)."""
    return cv2.blur(levels[thumb].astype(np.float32), (PATCH, PATCH))


def inside(points: np.ndarray, box: Box) -> np.ndarray:
    """Which ``points`` (n x 2) lie in ``box``, grown by ``EDGE`` of its sides."""
    x1, y1, x2, y2 = box
    dx, dy = EDGE * (x2 - x1), EDGE * (y2 - y1)
    return ((points[:, 0] >= x1 - dx) & (points[:, 0] <= x2 + dx)
            & (points[:, 1] >= y1 - dy) & (points[:, 1] <= y2 + dy))


def frame_inliers(inliers: tuple[np.ndarray, np.ndarray], query_frame: Frame | None,
                  reference_frame: Frame | None) -> int:
    """How many inliers (query points, reference points) lie on a frame of either image."""
    on = [f.covers(points) for points, f in zip(inliers, (query_frame, reference_frame),
                                                 strict=True) if f is not None]
    return int(np.logical_or.reduce(on).sum()) if on else 0
