"""DISC21 / AugLy-style image edits that know exactly where the original content went.

Every edit takes a PIL RGB image and a ``numpy.random.Generator`` (all randomness comes from
it, so a seed reproduces an edit bit for bit) and returns an ``Edited``: the new image, a short
DISC21-like label (``"crop0.41x0.70"``, ``"rot-7"``, ``"jpeg16"``) and a 3x3 homography from
SOURCE pixel coordinates to OUTPUT pixel coordinates. Coordinates follow OpenCV: pixel ``(i, j)``
has its centre at ``x = i, y = j``, so a resize from ``w`` to ``W`` maps ``x`` to
``(x + 0.5) * W / w - 0.5``. Photometric and overlay edits return the identity.

``random_chain`` composes one to three random edits (labels joined with ``"+"``, transforms
multiplied) and caps the result's long side; ``EDITS`` registers every edit by name.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from common.images import ImageError, read_image, resize_long_side

log = logging.getLogger(__name__)

Rng = np.random.Generator
RGB = tuple[int, int, int]
MAX_BACKGROUND_SIDE = 1024
WORDS = (
    "copy", "image", "sale", "hello", "world", "photo", "share", "like", "follow", "news",
    "today", "best", "original", "fake", "free", "click", "summer", "wow", "love", "trip",
    "2021", "meme", "viral", "lol", "when", "you", "me", "the", "new", "look", "this", "is",
)


@dataclass
class Edited:
    """An edited image, its label and the homography from source to output pixel coords."""

    image: Image.Image
    label: str
    transform: np.ndarray


# ---------------------------------------------------------------- geometry helpers


def translation(tx: float, ty: float) -> np.ndarray:
    """Homography that shifts by ``(tx, ty)`` pixels."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float) -> np.ndarray:
    """Homography of a resize by ``(sx, sy)`` with pixel-centre alignment (as cv2 and PIL)."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def map_points(transform: np.ndarray, points: Iterable[Sequence[float]]) -> np.ndarray:
    """Apply a 3x3 homography to ``(N, 2)`` points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    hom = np.c_[pts, np.ones(len(pts))] @ np.asarray(transform, dtype=np.float64).T
    return hom[:, :2] / hom[:, 2:3]


def then(first: Edited, second: Edited) -> Edited:
    """Compose ``second`` after ``first``: labels joined with "+", transforms multiplied."""
    label = "+".join(s for s in (first.label, second.label) if s)
    transform = second.transform @ first.transform
    return Edited(second.image, label, transform / transform[2, 2])


def _identity(img: Image.Image, label: str) -> Edited:
    """Wrap a photometric result: same geometry."""
    return Edited(img.convert("RGB"), label, np.eye(3))


def _resize(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """Resize to ``size`` (antialiased) and return the image with its exact homography."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    down = size[0] * size[1] < img.width * img.height
    out = img.resize(size, Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
    return out, scaling(size[0] / img.width, size[1] / img.height)


def limit_size(img: Image.Image, max_side: int) -> Edited:
    """Downscale (never upscale) so the long side is at most ``max_side``; empty label."""
    scale = max_side / max(img.size)
    if scale >= 1:
        return _identity(img, "")
    out, transform = _resize(img, (round(img.width * scale), round(img.height * scale)))
    return Edited(out, "", transform)


def _warp(img: Image.Image, transform: np.ndarray, fill: RGB) -> Edited:
    """Warp with ``transform``, shifted so the whole result fits; returns image and transform."""
    w, h = img.size
    corners = map_points(transform, [(-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, h - 0.5),
                                     (-0.5, h - 0.5)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    out_w, out_h = (math.ceil(v - 1e-6) for v in hi - lo)
    full = translation(-0.5 - lo[0], -0.5 - lo[1]) @ transform
    arr = cv2.warpPerspective(np.asarray(img), full, (out_w, out_h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    return Edited(Image.fromarray(arr), "", full / full[2, 2])


# ---------------------------------------------------------------- drawing helpers


def random_colour(rng: Rng, lo: int = 0, hi: int = 256) -> RGB:
    """A random RGB colour, each channel in [``lo``, ``hi``)."""
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _fill(rng: Rng) -> RGB:
    """Border fill: black, white or a random colour."""
    choice = rng.integers(3)
    return ((0, 0, 0), (255, 255, 255), random_colour(rng))[choice]


@lru_cache(maxsize=32)
def builtin_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` px (offline; bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):
        return ImageFont.load_default()


def random_words(rng: Rng, lo: int, hi: int, vocabulary: Sequence[str] = WORDS) -> str:
    """Between ``lo`` and ``hi`` random words of ``vocabulary``."""
    return " ".join(rng.choice(vocabulary, int(rng.integers(lo, hi + 1))))


def _texture(rng: Rng, size: tuple[int, int]) -> Image.Image:
    """Smooth random colour noise (a stand-in background or patch)."""
    cells = rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3))
    small = Image.fromarray(cells.astype(np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


@lru_cache(maxsize=64)
def _load_photo(path: str) -> np.ndarray | None:
    """A background photo, long side capped; None (logged once) if it cannot be decoded."""
    try:
        arr, _ = read_image(path, "RGB", min_side=MAX_BACKGROUND_SIDE // 2)
    except (ImageError, FileNotFoundError) as err:
        log.warning("background %s skipped: %s", path, err)
        return None
    arr = resize_long_side(arr, MAX_BACKGROUND_SIDE)
    arr.setflags(write=False)
    return arr


def _photo(rng: Rng, backgrounds: Sequence[Path], size: tuple[int, int]) -> Image.Image:
    """A random background photo (or a texture of ``size`` when none can be read)."""
    if len(backgrounds):
        arr = _load_photo(str(backgrounds[int(rng.integers(len(backgrounds)))]))
        if arr is not None:
            return Image.fromarray(arr).copy()
    return _texture(rng, size)


# ---------------------------------------------------------------- geometric edits


def crop(img: Image.Image, rng: Rng) -> Edited:
    """Keep a random window of 35-90% of each side."""
    w, h = img.size
    fx, fy = rng.uniform(0.35, 0.9, 2)
    cw, ch = min(w, max(16, round(w * fx))), min(h, max(16, round(h * fy)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((left, top, left + cw, top + ch))
    return Edited(out, f"crop{cw / w:.2f}x{ch / h:.2f}", translation(-left, -top))


def pad(img: Image.Image, rng: Rng) -> Edited:
    """Add borders of 3-30% of the side on each edge, flat colour or noise."""
    w, h = img.size
    left, top, right, bottom = (round(f * s) for f, s in zip(rng.uniform(0.03, 0.3, 4),
                                                              (w, h, w, h), strict=True))
    size = (w + left + right, h + top + bottom)
    if rng.random() < 0.3:
        noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        canvas = Image.fromarray(noise)
    else:
        canvas = Image.new("RGB", size, _fill(rng))
    canvas.paste(img, (left, top))
    return Edited(canvas, "pad", translation(left, top))


def rotate(img: Image.Image, rng: Rng, angle: float | None = None) -> Edited:
    """Rotate counter-clockwise by a random angle (mostly small), expanding with a fill."""
    if angle is None:
        mag = rng.uniform(2, 35) if rng.random() < 0.8 else rng.uniform(35, 180)
        angle = float(mag * rng.choice([-1, 1]))
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    out = _warp(img, np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]), _fill(rng))
    out.label = f"rot{round(angle)}"
    return out


def rot90(img: Image.Image, rng: Rng) -> Edited:
    """Rotate counter-clockwise by 90, 180 or 270 degrees."""
    k = int(rng.integers(1, 4))
    w, h = img.size
    ops = {1: (Image.Transpose.ROTATE_90, [[0, 1, 0], [-1, 0, w - 1]]),
           2: (Image.Transpose.ROTATE_180, [[-1, 0, w - 1], [0, -1, h - 1]]),
           3: (Image.Transpose.ROTATE_270, [[0, -1, h - 1], [1, 0, 0]])}
    op, rows = ops[k]
    return Edited(img.transpose(op), f"rot{90 * k}", np.array([*rows, [0, 0, 1]], float))


def hflip(img: Image.Image, rng: Rng) -> Edited:
    """Mirror left-right."""
    transform = np.array([[-1.0, 0.0, img.width - 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return Edited(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "hflip", transform)


def vflip(img: Image.Image, rng: Rng) -> Edited:
    """Mirror top-bottom."""
    transform = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, img.height - 1], [0.0, 0.0, 1.0]])
    return Edited(img.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "vflip", transform)


def scale(img: Image.Image, rng: Rng) -> Edited:
    """Shrink both sides by 0.25-0.8 (the short side stays at least 64 px where possible)."""
    f = rng.uniform(0.25, 0.8)
    f = min(max(f, 64 / min(img.size)), 1.0)
    out, transform = _resize(img, (round(img.width * f), round(img.height * f)))
    return Edited(out, f"scale{f:.2f}", transform)


def aspect(img: Image.Image, rng: Rng) -> Edited:
    """Change the aspect ratio by a factor 0.5-2.0 at constant area."""
    r = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    w, h = img.size
    out, transform = _resize(img, (round(w * math.sqrt(r)), round(h / math.sqrt(r))))
    return Edited(out, f"aspect{r:.2f}", transform)


def perspective(img: Image.Image, rng: Rng) -> Edited:
    """Mild perspective warp: each corner moves by up to 5-15% of the sides."""
    w, h = img.size
    m = rng.uniform(0.05, 0.15)
    src = np.float32([(0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1)])
    dst = src + (rng.uniform(-m, m, (4, 2)) * (w, h)).astype(np.float32)
    out = _warp(img, cv2.getPerspectiveTransform(src, dst).astype(np.float64), _fill(rng))
    out.label = f"persp{m:.2f}"
    return out


def onto_bg(img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = (),
            frac_range: tuple[float, float] = (0.35, 0.8), overflow: float = 0.0) -> Edited:
    """Paste the image, scaled to 35-80% (``frac_range``) of the background's size, onto
    another photo; up to ``overflow`` of the copy's width and height may fall outside."""
    bg = _photo(rng, backgrounds, (round(img.width * 1.8), round(img.height * 1.8)))
    if max(bg.size) < max(img.size):  # a small background would shrink the copy too much
        bg, _ = _resize(bg, tuple(round(v * max(img.size) / max(bg.size)) for v in bg.size))
    frac = rng.uniform(*frac_range)
    f = frac * min(bg.width / img.width, bg.height / img.height)
    small, transform = _resize(img, (round(img.width * f), round(img.height * f)))
    ox, oy = round(overflow * small.width), round(overflow * small.height)
    x0 = int(rng.integers(-ox, bg.width - small.width + ox + 1))
    y0 = int(rng.integers(-oy, bg.height - small.height + oy + 1))
    bg.paste(small, (x0, y0))
    return Edited(bg, f"onto_bg{frac:.2f}", translation(x0, y0) @ transform)


# ---------------------------------------------------------------- photometric edits


def color(img: Image.Image, rng: Rng) -> Edited:
    """Colour jitter: brightness, contrast, saturation and hue."""
    b, c, s = rng.uniform(0.55, 1.5), rng.uniform(0.5, 1.7), rng.uniform(0.0, 2.2)
    out = ImageEnhance.Brightness(img).enhance(b)
    out = ImageEnhance.Color(ImageEnhance.Contrast(out).enhance(c)).enhance(s)
    hsv = np.array(out.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-30, 31))) % 256
    return _identity(Image.fromarray(hsv, "HSV").convert("RGB"), "color")


def gray(img: Image.Image, rng: Rng) -> Edited:
    """Greyscale (kept as 3-channel RGB)."""
    return _identity(ImageOps.grayscale(img), "gray")


def blur(img: Image.Image, rng: Rng) -> Edited:
    """Gaussian blur with sigma 1-5 px."""
    sigma = rng.uniform(1.0, 5.0)
    return _identity(img.filter(ImageFilter.GaussianBlur(sigma)), f"blur{sigma:.1f}")


def jpeg(img: Image.Image, rng: Rng) -> Edited:
    """Re-encode as JPEG with quality 5-35."""
    quality = int(rng.integers(5, 36))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return _identity(out.convert("RGB"), f"jpeg{quality}")


def noise(img: Image.Image, rng: Rng) -> Edited:
    """Additive gaussian noise, sigma 3-12% of the range."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(0.03, 0.12) * 255, arr.shape).astype(np.float32)
    return _identity(Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)), "noise")


def sharpen(img: Image.Image, rng: Rng) -> Edited:
    """Strong unsharp masking."""
    radius, percent = rng.uniform(1.0, 4.0), int(rng.integers(150, 401))
    return _identity(img.filter(ImageFilter.UnsharpMask(radius, percent, 0)), "sharpen")


def pixelize(img: Image.Image, rng: Rng) -> Edited:
    """Mosaic: downscale by 0.1-0.35 and blow back up with nearest neighbour."""
    r = rng.uniform(0.1, 0.35)
    small = img.resize((max(4, round(img.width * r)), max(4, round(img.height * r))),
                       Image.Resampling.BOX)
    return _identity(small.resize(img.size, Image.Resampling.NEAREST), f"pixelize{r:.2f}")


# ---------------------------------------------------------------- overlays and frames


def occlude(img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = ()) -> Edited:
    """Cover 20-45% of the area with a flat-colour or photo rectangle."""
    w, h = img.size
    area, ratio = rng.uniform(0.2, 0.45) * w * h, math.exp(rng.uniform(-0.7, 0.7))
    pw = min(w, max(1, round(math.sqrt(area * ratio))))
    ph = min(h, max(1, round(area / pw)))
    if rng.random() < 0.5:
        patch = Image.new("RGB", (pw, ph), random_colour(rng))
    else:
        patch, _ = _resize(_photo(rng, backgrounds, (pw, ph)), (pw, ph))
    out = img.copy()
    out.paste(patch, (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    return _identity(out, f"occlude{pw * ph / (w * h):.2f}")


def text(img: Image.Image, rng: Rng) -> Edited:
    """One to three lines of random words in random colours."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = img.size
    for _ in range(int(rng.integers(1, 4))):
        size = max(10, round(min(w, h) * rng.uniform(0.06, 0.16)))
        xy = (rng.uniform(-0.05, 0.6) * w, rng.uniform(0.0, max(1.0, h - 1.2 * size)))
        stroke = int(rng.integers(0, 3)) * max(1, size // 15)
        draw.text(xy, random_words(rng, 1, 4), fill=random_colour(rng), font=builtin_font(size),
                  stroke_width=stroke, stroke_fill=random_colour(rng))
    return _identity(out, "text")


def _draw_emoji(kind: str, size: int, rng: Rng) -> Image.Image:
    """A vector smiley, star or heart on a transparent RGBA square (drawn at 4x)."""
    s = 4 * size
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    ink = (40, 25, 10, 255)
    if kind == "smiley":
        d.ellipse((s * 0.02, s * 0.02, s * 0.98, s * 0.98), fill=(255, 205, 40, 255),
                  outline=ink, width=s // 30)
        for cx in (0.35, 0.65):
            d.ellipse((s * (cx - 0.06), s * 0.28, s * (cx + 0.06), s * 0.45), fill=ink)
        d.arc((s * 0.25, s * 0.3, s * 0.75, s * 0.78), 20, 160, fill=ink, width=s // 20)
    elif kind == "star":
        t = np.pi / 5 * np.arange(10) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 0.48, 0.2) * s
        pts = list(zip(s / 2 + r * np.cos(t), s / 2 + r * np.sin(t) + s * 0.03, strict=True))
        d.polygon(pts, fill=(*random_colour(rng)[:2], 40, 255), outline=ink, width=s // 40)
    else:
        t = np.linspace(0, 2 * np.pi, 120)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t)
        y = y - np.cos(4 * t)
        pts = list(zip(s / 2 + x * s / 35, s * 0.45 - y * s / 35, strict=True))
        d.polygon(pts, fill=(230, int(rng.integers(20, 120)), 90, 255))
    return layer.resize((size, size), Image.Resampling.LANCZOS)


def emoji(img: Image.Image, rng: Rng) -> Edited:
    """A vector emoji (smiley, star or heart) 10-35% of the short side."""
    frac = rng.uniform(0.1, 0.35)
    size = max(8, round(min(img.size) * frac))
    layer = _draw_emoji(str(rng.choice(["smiley", "star", "heart"])), size, rng)
    alpha = np.asarray(layer)[..., 3].astype(np.float32) * rng.uniform(0.7, 1.0)
    layer.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    out = img.convert("RGBA")
    xy = (int(rng.integers(0, img.width - size + 1)), int(rng.integers(0, img.height - size + 1)))
    out.alpha_composite(layer, xy)
    return _identity(out, f"emoji{frac:.2f}")


def _fit_font(
    draw: ImageDraw.ImageDraw, line: str, width: int, size: int
) -> ImageFont.FreeTypeFont:
    """The largest built-in font size <= ``size`` whose rendering of ``line`` fits ``width``."""
    while size > 8 and draw.textlength(line, font=builtin_font(size)) > width:
        size = int(size * 0.85)
    return builtin_font(size)


def meme(img: Image.Image, rng: Rng) -> Edited:
    """Meme-style caption: a white or black band (top, bottom or both) holding text."""
    w, h = img.size
    band = max(16, round(h * rng.uniform(0.15, 0.3)))
    where = rng.choice(["top", "bottom", "both"], p=[0.6, 0.2, 0.2])
    top = band if where != "bottom" else 0
    bottom = band if where != "top" else 0
    bg, ink = ((255, 255, 255), (0, 0, 0)) if rng.random() < 0.6 else ((0, 0, 0), (255, 255, 255))
    canvas = Image.new("RGB", (w, h + top + bottom), bg)
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    for y0 in [y for y, on in ((0, top), (top + h, bottom)) if on]:
        line = random_words(rng, 2, 6).upper() if rng.random() < 0.5 else random_words(rng, 2, 6)
        font = _fit_font(draw, line, int(w * 0.92), int(band * 0.55))
        draw.text((w / 2, y0 + band / 2), line, fill=ink, font=font, anchor="mm")
    return Edited(canvas, "meme", translation(0, top))


def screenshot(img: Image.Image, rng: Rng) -> Edited:
    """The image, scaled by 0.6-1.0, inside a flat app-like frame with bars and a side panel."""
    small, transform = _resize(img, tuple(round(v * rng.uniform(0.6, 1.0)) for v in img.size))
    w, h = small.size
    bar, margin = max(12, round(h * rng.uniform(0.06, 0.12))), round(w * rng.uniform(0.02, 0.08))
    side = round(w * rng.uniform(0.15, 0.3)) if rng.random() < 0.4 else 0
    bottom = bar if rng.random() < 0.5 else 0
    dark = rng.random() < 0.4
    bgc, barc, inkc = ((30, 30, 34), (50, 50, 56), (120, 120, 128)) if dark else (
        (246, 246, 246), (225, 225, 230), (170, 170, 178))
    canvas = Image.new("RGB", (side + w + 2 * margin, bar + h + 2 * margin + bottom), bgc)
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, canvas.width, bar), fill=barc)
    for i, c in enumerate(((237, 106, 94), (245, 191, 79), (98, 197, 84))):
        d.ellipse((bar * (0.3 + 0.6 * i), bar * 0.3, bar * (0.7 + 0.6 * i), bar * 0.7), fill=c)
    if canvas.width * 0.8 > bar * 2.4:  # an address bar, where a narrow frame has room
        d.rounded_rectangle((bar * 2.4, bar * 0.2, canvas.width * 0.8, bar * 0.8), bar // 4,
                            fill=bgc)
    for y in range(bar + margin, bar + margin + h, max(8, bar // 2)):
        d.rectangle((margin, y, margin + side * rng.uniform(0.4, 0.9), y + bar // 6), fill=inkc)
    if bottom:
        d.rectangle((0, canvas.height - bottom, canvas.width, canvas.height), fill=barc)
        for i in range(5):
            x = canvas.width * (0.1 + 0.2 * i)
            d.rectangle((x - bottom / 4, canvas.height - bottom * 0.75, x + bottom / 4,
                         canvas.height - bottom * 0.25), fill=inkc)
    canvas.paste(small, (side + margin, bar + margin))
    return Edited(canvas, "screenshot", translation(side + margin, bar + margin) @ transform)


def stripes(img: Image.Image, rng: Rng) -> Edited:
    """Semi-opaque bands of flat colour (horizontal or vertical) over 15-40% of the image."""
    w, h = img.size
    horizontal = rng.random() < 0.5
    side = h if horizontal else w
    n = int(rng.integers(2, 7))
    width = max(2, round(side * rng.uniform(0.15, 0.4) / n))
    n = min(n, max(1, side - width))  # a tiny image holds fewer bands
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    for start in rng.choice(max(1, side - width), n, replace=False):
        box = (0, start, w, start + width) if horizontal else (start, 0, start + width, h)
        draw.rectangle(box, fill=round(255 * rng.uniform(0.4, 0.9)))
    return _identity(Image.composite(Image.new("RGB", img.size, random_colour(rng)), img, mask),
                     f"stripes{n}")


def opacity(img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = ()) -> Edited:
    """Blend a photo (or a flat colour) over the whole image at 20-45% opacity."""
    alpha = rng.uniform(0.2, 0.45)
    top = (_photo(rng, backgrounds, img.size) if rng.random() < 0.6
           else Image.new("RGB", img.size, random_colour(rng)))
    return _identity(Image.blend(img, top.resize(img.size), alpha), f"opacity{alpha:.2f}")


# ---------------------------------------------------------------- registry and chains

EDITS: dict[str, Callable[..., Edited]] = {
    "crop": crop, "pad": pad, "rotate": rotate, "rot90": rot90, "hflip": hflip,
    "vflip": vflip, "scale": scale, "aspect": aspect, "perspective": perspective,
    "onto_bg": onto_bg, "color": color, "gray": gray, "blur": blur, "jpeg": jpeg,
    "noise": noise, "sharpen": sharpen, "pixelize": pixelize, "occlude": occlude,
    "text": text, "emoji": emoji, "meme": meme, "screenshot": screenshot,
    "stripes": stripes, "opacity": opacity,
}
# What ``random_chain`` draws from by default: the kinds added later only when asked for, so
# a benchmark built before them is the same for its seed.
CHAIN_KINDS = tuple(k for k in EDITS if k not in {"stripes", "opacity"})
GEOMETRIC = frozenset({"crop", "pad", "rotate", "rot90", "hflip", "vflip", "scale", "aspect",
                       "perspective", "onto_bg", "meme", "screenshot"})
USES_BACKGROUNDS = frozenset({"onto_bg", "occlude", "opacity"})
WEIGHTS: dict[str, float] = {
    "crop": 3, "pad": 1.5, "rotate": 2, "rot90": 1, "hflip": 2, "vflip": 0.5, "scale": 2,
    "aspect": 1.2, "perspective": 1, "onto_bg": 2.5, "color": 2, "gray": 1.5, "blur": 1.5,
    "jpeg": 2, "noise": 1.5, "sharpen": 0.5, "pixelize": 0.7, "occlude": 1.5, "text": 2,
    "emoji": 2, "meme": 1, "screenshot": 0.8, "stripes": 1, "opacity": 1,
}
# Pairs that together would leave too little of the original (or nest frames in frames).
INCOMPATIBLE = (
    {"crop", "occlude"}, {"meme", "screenshot"}, {"onto_bg", "screenshot"},
    {"pixelize", "blur"}, {"pixelize", "scale"}, {"rotate", "rot90"},
)


def apply_edit(name: str, img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = ()) -> Edited:
    """Run the registered edit ``name`` (passing ``backgrounds`` to those that use photos)."""
    img = img.convert("RGB")
    if name in USES_BACKGROUNDS:
        return EDITS[name](img, rng, backgrounds=backgrounds)
    return EDITS[name](img, rng)


def _pick(rng: Rng, names: Sequence[str], n: int) -> list[str]:
    """Draw ``n`` distinct compatible edit names by weight; JPEG goes last."""
    pool, chosen = list(names), []
    while pool and len(chosen) < n:
        p = np.array([WEIGHTS.get(k, 1.0) for k in pool])
        name = str(rng.choice(pool, p=p / p.sum()))
        chosen.append(name)
        pool = [k for k in pool if k != name and {k, name} not in INCOMPATIBLE]
    return sorted(chosen, key=lambda k: k == "jpeg")


def random_chain(img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = (),
                 n_edits: tuple[int, int] = (1, 3), kinds: Iterable[str] | None = None,
                 max_side: int = 1024) -> Edited:
    """Apply ``n_edits`` (inclusive range) random edits in sequence; cap the long side."""
    names = list(CHAIN_KINDS) if kinds is None else list(kinds)
    unknown = sorted(set(names) - set(EDITS))
    if unknown or not names:
        raise ValueError(f"unknown or no edit kinds: {unknown or names}")
    result = _identity(img, "")
    for name in _pick(rng, names, int(rng.integers(n_edits[0], n_edits[1] + 1))):
        result = then(result, apply_edit(name, result.image, rng, backgrounds))
    return then(result, limit_size(result.image, max_side))


def small_copy_chain(img: Image.Image, rng: Rng, backgrounds: Sequence[Path] = (),
                     max_side: int = 1024) -> Edited:
    """A small pasted copy: the image at 25-60% of another photo's side, maybe inside a meme
    or screenshot frame, one or two overlays over the whole (stripes, opacity, pixelation,
    noise, text, emoji), JPEG last; the long side capped."""
    out = onto_bg(img, rng, backgrounds, frac_range=(0.25, 0.6))
    frame = str(rng.choice(["", "meme", "screenshot"], p=[0.5, 0.25, 0.25]))
    if frame:
        out = then(out, apply_edit(frame, out.image, rng))
    overlays = ["stripes", "opacity", "pixelize", "noise", "text", "emoji"]
    for name in rng.choice(overlays, int(rng.integers(1, 3)), replace=False):
        out = then(out, apply_edit(str(name), out.image, rng, backgrounds))
    out = then(out, limit_size(out.image, max_side))
    return then(out, apply_edit("jpeg", out.image, rng))
