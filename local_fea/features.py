"""RootSIFT local features of one image, and read access to a store of them.

A shard payload holds, for its images in manifest order: ``ids``, ``status`` (``""`` or the
reason the image was skipped), ``size`` (full oriented width, height), one packed
``kpts``/``desc`` pair per view (``orig``; queries also ``mirror``), and a small grey
thumbnail per image for photometric verification. Keypoints are ``(x, y, size, angle)`` in
full-resolution coordinates of the view (the mirror view's x runs from the right edge).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.images import read_image, resize_long_side, resize_short_side
from common.shards import ShardStore, unpack

VIEWS = ("orig", "mirror")
ROOTSIFT_SCALE = 512.0  # RootSIFT components are <= ~0.36: x512 keeps them inside uint8


@dataclass
class ImageFeatures:
    """Everything extracted from one image."""

    size: tuple[int, int]
    views: dict[str, tuple[np.ndarray, np.ndarray]]  # view -> (kpts float32 (n, 4), desc uint8)
    thumb: np.ndarray  # uint8 grey, long side <= thumb_side


def rootsift(
    gray: np.ndarray, conf: dict[str, Any], max_keypoints: int
) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints ``(x, y, size, angle)`` and uint8 RootSIFT descriptors of a grey image."""
    sift = cv2.SIFT_create(
        nfeatures=max_keypoints,
        contrastThreshold=conf["contrast_threshold"],
        edgeThreshold=conf["edge_threshold"],
    )
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or not keypoints:
        return np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8)
    kpts = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], np.float32)
    desc /= desc.sum(axis=1, keepdims=True) + 1e-7  # L1, then sqrt: RootSIFT (unit L2 norm)
    np.sqrt(desc, out=desc)
    desc *= ROOTSIFT_SCALE
    return kpts, np.clip(np.rint(desc, out=desc), 0, 255).astype(np.uint8)


def _mirror_order() -> np.ndarray:
    """Descriptor permutation that turns a SIFT descriptor into that of the mirror image.

    OpenCV lays a descriptor out as 4 x 4 spatial bins (rows along the keypoint's
    orientation) x 8 orientation bins. Mirroring the image reflects each keypoint's frame
    about its orientation axis: spatial rows run the other way and orientation bin ``o``
    becomes ``-o`` (mod 8)."""
    bins = np.arange(128).reshape(4, 4, 8)
    return bins[::-1][:, :, -np.arange(8) % 8].ravel()


MIRROR_ORDER = _mirror_order()


def mirror_view(kpts: np.ndarray, desc: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The SIFT features of the mirror image from those of an image ``width`` pixels wide (as
    ``rootsift`` returned them): the same keypoints reflected, their descriptors permuted.
    Equal to describing the flipped image for the keypoints both find (about 90 % of them), at
    no extra cost. OpenCV's keypoints sit a quarter pixel right of the pixel-centre grid (its
    first octave is the image upsampled 2x, with ``enable_precise_upscale`` off, the default),
    so x maps to ``width - 0.5 - x``."""
    out = kpts.copy()
    out[:, 0] = width - 0.5 - kpts[:, 0]
    angle = (180.0 - kpts[:, 3]) % 360.0
    out[:, 3] = np.where(angle >= 360.0, 0.0, angle)  # float32 rounding can give 360
    return out, desc[:, MIRROR_ORDER]


def extract_image(path: str | Path, conf: dict[str, Any], mirror: bool) -> ImageFeatures:
    """Decode, downscale to ``short_side`` and describe one image.

    ``mirror`` describes it as a query: its mirror image too (``mirror_view``), with the query
    keypoint budget (a pasted or overlaid copy may hold few of the image's strongest
    keypoints)."""
    budget = conf["query_max_keypoints"] if mirror else conf["max_keypoints"]
    gray, (width, height) = read_image(path, "L", conf["short_side"], conf["max_pixels"])
    small = resize_short_side(gray, conf["short_side"])
    scale = np.array([width / small.shape[1], height / small.shape[0]], np.float32)
    kpts, desc = rootsift(small, conf, budget)
    views = {"orig": (kpts, desc)}
    if mirror:
        views["mirror"] = mirror_view(kpts, desc, small.shape[1])
    for kpts, _ in views.values():
        kpts[:, :2] = (kpts[:, :2] + 0.5) * scale - 0.5  # pixel centres, full resolution
        kpts[:, 2] *= scale.mean()
    return ImageFeatures((width, height), views, resize_long_side(small, conf["thumb_side"]))


class LocalFeatures:
    """Read one image's features from a store without loading the rest of its shard."""

    def __init__(self, root: str | Path):
        self.store = ShardStore(root)

    def _shard(self, image_id: str) -> tuple[dict[str, Any], int]:
        k, row = self.store.locate(image_id)
        return self.store.load(k), row

    def status(self, image_id: str) -> str:
        shard, row = self._shard(image_id)
        return shard["status"][row]

    def image(self, image_id: str, view: str = "orig") -> ImageFeatures:
        """One view of one image with its full size and thumbnail, from one shard lookup
        (what verification reads of each side of a pair)."""
        shard, row = self._shard(image_id)
        packed = shard["views"][view]
        width, height = (int(v) for v in shard["size"][row])
        h, w = shard["thumb_shape"][row]
        return ImageFeatures((width, height),
                             {view: (unpack(packed["kpts"], row), unpack(packed["desc"], row))},
                             unpack(shard["thumbs"], row).reshape(h, w))

    def size(self, image_id: str) -> tuple[int, int]:
        return self.image(image_id).size

    def get(self, image_id: str, view: str = "orig") -> tuple[np.ndarray, np.ndarray]:
        """(kpts, desc) of one view of one image."""
        return self.image(image_id, view).views[view]

    def thumb(self, image_id: str) -> np.ndarray:
        return self.image(image_id).thumb

    def views(self) -> list[str]:
        if not self.store.shards:
            return list(VIEWS[:1])
        return list(self.store.load(0)["views"])
