"""Photos in and out for the data builders (benchmarks, the detector's synthetic set)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from common.images import ImageError, list_images, read_image, resize_long_side
from common.io import atomic_path

log = logging.getLogger(__name__)


def readable_photos(folder: str | Path) -> list[Path]:
    """The decodable images under ``folder``; each unreadable one is logged and skipped."""
    good = []
    for path in list_images(folder).paths:
        try:
            read_image(path, "L", min_side=64)
        except ImageError as err:
            log.warning("skipped unreadable photo %s: %s", path, err)
            continue
        good.append(path)
    return good


def load_photo(path: Path, max_side: int) -> Image.Image:
    """Decode ``path`` as RGB with its long side capped at ``max_side``."""
    arr, _ = read_image(path, "RGB")
    return Image.fromarray(resize_long_side(arr, max_side))


def save_jpeg(img: Image.Image, path: Path, quality: int) -> None:
    """Write ``img`` as a JPEG, atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=quality)
