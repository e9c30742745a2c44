"""Image sets (ids are file stems, or file names / relative paths) and robust image decoding.

``read_image`` turns whatever a user's folder holds into an 8-bit grey or RGB array, or raises
``ImageError`` with a one-line reason: corrupt, truncated, empty and non-image files, images
over the pixel limit (decompression bombs), CMYK, 16-bit, float, palette, alpha and animated
images, and EXIF-rotated photos. JPEGs are decoded at a reduced DCT scale when only a small
version is needed, which is much faster than decoding the full image and resizing it.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common import UserError
from common.config import digest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
)
DEFAULT_MAX_PIXELS = 150_000_000
_PIL_LIMIT_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is one line for the skip report."""


class DuplicateIdError(UserError):
    """Two files of one image set share a stem, hence an id."""


@dataclass(frozen=True)
class ImageSet:
    """The images of one folder, sorted by id."""

    name: str
    root: Path
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    ignored: tuple[Path, ...] = ()
    id_kind: str = "stem"  # how ids were made (``ID_KINDS``)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> str:
        """``<name>-<hash of the resolved folder>``: readable, and distinct for two folders
        that share a name, so a lookup never returns another folder's outputs."""
        if self.id_kind == "stem":
            return f"{self.name}-{digest(str(self.root.resolve()))}"
        return f"{self.name}-{digest(str(self.root.resolve()), self.id_kind)}"


ID_KINDS = ("stem", "name", "relative_stem")


def image_id(path: Path, root: Path, kind: str) -> str:
    """The id of ``path`` under ``root``: its stem (``run``'s DISC21 ids), its path relative
    to ``root`` (``name``: the file name in a flat folder; ``dedupe``, where ``a.jpg`` and
    ``a.png`` are two images), or that path less its last suffix (``relative_stem``: the
    crops written as ``<id>.jpg``)."""
    if kind == "stem":
        return path.stem
    relative = path.relative_to(root).as_posix()
    return relative if kind == "name" else relative[: -len(path.suffix) or None]


def list_images(folder: str | Path, name: str | None = None, ids: str = "stem") -> ImageSet:
    """List the images under ``folder`` (recursively); ids (``image_id`` of kind ``ids``)
    must be unique.

    Files whose suffix is not an image suffix are listed in ``ignored`` (and logged), hidden
    files are skipped. Files with an image suffix but no image inside, broken symbolic links
    and special files (FIFOs, sockets, devices) are kept: decoding them fails later with a
    clear reason in the skip report (a special file is never opened).
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    by_id: dict[str, Path] = {}
    ignored = []
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(path)
            continue
        key = image_id(path, root, ids)
        if key in by_id:
            raise DuplicateIdError(f"duplicate image id {key!r}: {by_id[key]} and {path}")
        by_id[key] = path
    if ignored:
        log.warning(
            "%s: ignored %d file(s) without an image suffix, e.g. %s",
            root, len(ignored), ", ".join(p.name for p in ignored[:3]),
        )
    sorted_ids = tuple(sorted(by_id))
    return ImageSet(
        name=name or root.resolve().name,
        root=root,
        ids=sorted_ids,
        paths=tuple(by_id[i] for i in sorted_ids),
        ignored=tuple(ignored),
        id_kind=ids,
    )


def special_kind(mode: int) -> str:
    """What a file that is not a regular file is, from its ``st_mode``."""
    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def is_broken_link(path: Path) -> bool:
    """A symbolic link to nothing."""
    return path.is_symlink() and not path.exists()


def input_images(images: str | Path | ImageSet, ids: str = "stem") -> ImageSet:
    """The image set of a user's input folder, which must hold images (an ``ImageSet`` made
    by the pipeline, such as the crops, is taken as it is); ids as in ``list_images``."""
    if isinstance(images, ImageSet):
        return images
    found = list_images(images, ids=ids)
    if not found.ids:
        raise UserError(f"{found.root} holds no images (no file ending in .jpg, .png or another "
                        "image suffix): give a folder of images")
    return found


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation is applied."""
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF block: orientation is ignored, like exif_transpose does
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float images scaled to 8 bits (PIL would clip them)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:
        arr = arr.astype(np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = np.nan_to_num((arr - lo) * (255.0 / max(hi - lo, 1e-12)))
        arr = arr.round().astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode to ``L`` or ``RGB``; transparency is composited over white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    return img.convert(mode) if img.mode != mode else img


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb check, which ``read_image`` replaces by
    its own ``max_pixels`` test before any pixel is decoded. The check is off only while the
    header is parsed, under a lock, so the process-wide setting of other code is left alone."""
    with _PIL_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image(
    path: str | Path,
    mode: str = "L",
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` to a uint8 array (``mode`` ``"L"`` or ``"RGB"``), EXIF orientation applied.

    With ``min_side``, a JPEG may be decoded at a reduced scale whose short side is still at
    least ``min_side``; the caller resizes the rest of the way. Returns the array and the
    image's full (oriented) size ``(width, height)``, so coordinates can be mapped back.
    Animated images give their first frame. Raises ``ImageError`` for unusable input.
    """
    path = Path(path)
    if is_broken_link(path):
        raise ImageError(f"broken symbolic link to {os.readlink(path)}")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # opening a FIFO would wait for a writer
            raise ImageError(f"not a regular file: {special_kind(info.st_mode)}, not read")
        if info.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter is not actionable
            with _open_header(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"too large: {width}x{height} px is over the {max_pixels:,} px limit"
                    )
                if width == 0 or height == 0:
                    raise ImageError(f"degenerate size {width}x{height}")
                full_size = _oriented_size(img)
                if img.format == "JPEG":  # decode luma only, and at a reduced DCT scale
                    draft_size = None
                    if min_side and min(width, height) > min_side:
                        scale = min_side / min(width, height)
                        draft_size = (math.ceil(width * scale), math.ceil(height * scale))
                    img.draft(mode, draft_size)
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = np.asarray(_convert(img, mode))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"cannot decode: {reason}") from None
    if arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError("decoded to an empty array")
    return np.ascontiguousarray(arr), full_size


def _downscale(img: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def resize_short_side(img: np.ndarray, short_side: int) -> np.ndarray:
    """Downscale (never upscale) so that the short side is at most ``short_side`` pixels."""
    return _downscale(img, short_side / min(img.shape[:2]))


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """Downscale (never upscale) so that the long side is at most ``long_side`` pixels."""
    return _downscale(img, long_side / max(img.shape[:2]))
