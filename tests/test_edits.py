"""The edit library on real photos: outputs, labels, determinism and exact transforms.

Transforms are checked with a marker: the same edit (same seed) is applied to a photo with and
without a small disk painted at a known source point; the centroid of their difference must lie
where ``transform`` maps that point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data import edits
from data.edits import (
    EDITS,
    GEOMETRIC,
    Edited,
    apply_edit,
    map_points,
    random_chain,
    then,
)

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = (ROOT / "data" / "referenceimages", ROOT.parent / "shared" / "cc0_photos")
PREFIX = {"rotate": "rot", "rot90": "rot", "perspective": "persp"}
RADIUS = 12


def _photos() -> list[Path]:
    for folder in PHOTO_DIRS:
        found = sorted(folder.glob("*.jpg"))
        if len(found) >= 8:
            return found
    pytest.skip("no test photos (data/referenceimages or ../shared/cc0_photos)")


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return _photos()


@pytest.fixture(scope="module")
def img(photos) -> Image.Image:
    with Image.open(photos[0]) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def backgrounds(photos) -> list[Path]:
    return photos[4:8]


def _run(name: str, image: Image.Image, seed: int, backgrounds=()) -> Edited:
    return apply_edit(name, image, np.random.default_rng(seed), backgrounds)


def _marked(image: Image.Image, point: tuple[float, float]) -> Image.Image:
    """``image`` with a disk at ``point``, black or white, whichever contrasts more."""
    out = image.copy()
    x, y = point
    local = np.asarray(image.convert("L"))[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].mean()
    ink = (0, 0, 0) if local > 127 else (255, 255, 255)
    ImageDraw.Draw(out).ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS), fill=ink)
    return out


def _centroid(a: Image.Image, b: Image.Image) -> np.ndarray | None:
    """Centroid (x, y) of where two same-size images differ, weighted by the difference."""
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).sum(axis=2)
    diff[diff < 40] = 0
    ys, xs = np.nonzero(diff)
    if not len(xs):
        return None
    weights = diff[ys, xs]
    return np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


def _marker_error(make, image: Image.Image, point: tuple[float, float]) -> float | None:
    """Distance between the marker's centroid and its predicted spot; None if it left the view."""
    marked_src = _marked(image, point)
    plain, marked = make(image), make(marked_src)
    assert plain.image.size == marked.image.size and plain.label == marked.label
    np.testing.assert_allclose(plain.transform, marked.transform)
    if not _inside(plain.transform, plain.image.size, point):
        return None  # the disk is (partly) outside the edited image
    found = _centroid(plain.image, marked.image)
    assert found is not None, "marker not found although the transform keeps it inside"
    expected = map_points(plain.transform, [_centroid(image, marked_src)])[0]
    return float(np.linalg.norm(found - expected))


def _points(image: Image.Image) -> list[tuple[float, float]]:
    w, h = image.size
    return [(0.3 * w, 0.35 * h), (0.62 * w, 0.55 * h), (0.45 * w, 0.72 * h)]


def _inside(transform: np.ndarray, size: tuple[int, int], point: tuple[float, float]) -> bool:
    """Whether the whole marker disk around ``point`` maps into an image of ``size``."""
    ring = [(point[0] + RADIUS * np.cos(t), point[1] + RADIUS * np.sin(t))
            for t in np.linspace(0, 2 * np.pi, 16)]
    mapped = map_points(transform, ring)
    return bool(mapped.min() >= 1 and mapped[:, 0].max() <= size[0] - 2
                and mapped[:, 1].max() <= size[1] - 2)


def _check_markers(make_for_seed, image: Image.Image, seeds=range(4), min_checked=3,
                   keep=lambda seed, point: True, tol: float = 0.3) -> None:
    """Marker errors over seeds and points (those ``keep`` accepts) are all below ``tol`` px."""
    errors = []
    for seed in seeds:
        for point in _points(image):
            if keep(seed, point):
                err = _marker_error(lambda im, s=seed: make_for_seed(im, s), image, point)
                errors += [] if err is None else [err]
    assert len(errors) >= min_checked
    assert max(errors) < tol, errors


def test_every_edit_returns_rgb_image_label_and_transform(img, backgrounds):
    for name in EDITS:
        out = _run(name, img, 3, backgrounds)
        assert isinstance(out, Edited)
        assert out.image.mode == "RGB" and min(out.image.size) >= 16, name
        assert out.label and "+" not in out.label, name
        assert out.label.startswith(PREFIX.get(name, name)), (name, out.label)
        assert out.transform.shape == (3, 3) and out.transform.dtype == np.float64, name
        changed = out.image.size != img.size or not np.array_equal(np.asarray(out.image),
                                                                   np.asarray(img))
        assert changed, name
        if name not in GEOMETRIC:
            assert out.image.size == img.size, name
            np.testing.assert_array_equal(out.transform, np.eye(3))


def test_edits_are_deterministic_for_a_seed(img, backgrounds):
    for name in EDITS:
        a, b = _run(name, img, 11, backgrounds), _run(name, img, 11, backgrounds)
        assert a.label == b.label, name
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        np.testing.assert_array_equal(a.transform, b.transform)


@pytest.mark.parametrize("name", ["crop", "pad", "rot90", "hflip", "vflip", "meme"])
def test_pixel_exact_edits_move_pixels_as_the_transform_says(img, name):
    src = np.asarray(img)
    rng = np.random.default_rng(0)
    for seed in range(6):
        out = _run(name, img, seed)
        dst = np.asarray(out.image)
        pts = np.c_[rng.integers(0, img.width, 200), rng.integers(0, img.height, 200)]
        mapped = np.rint(map_points(out.transform, pts)).astype(int)
        inside = ((mapped >= 0) & (mapped < (out.image.width, out.image.height))).all(axis=1)
        assert inside.sum() > 20
        got = dst[mapped[inside, 1], mapped[inside, 0]]
        np.testing.assert_array_equal(got, src[pts[inside, 1], pts[inside, 0]])


def test_rot90_covers_all_quarter_turns_and_maps_corners(img):
    seen = set()
    for seed in range(12):
        out = _run("rot90", img, seed)
        seen.add(out.label)
        w, h = out.image.size
        corners = map_points(out.transform, [(0, 0), (img.width - 1, img.height - 1)])
        assert {tuple(c) for c in np.rint(corners).astype(int)} <= {(0, 0), (w - 1, h - 1),
                                                                    (w - 1, 0), (0, h - 1)}
    assert seen == {"rot90", "rot180", "rot270"}


@pytest.mark.parametrize(
    "name", ["crop", "pad", "rotate", "rot90", "hflip", "vflip", "scale", "aspect",
             "perspective", "onto_bg", "meme", "screenshot"],
)
def test_marker_lands_where_the_transform_maps_it(img, backgrounds, name):
    seeds = range(8) if name == "crop" else range(3)
    _check_markers(lambda im, s: _run(name, im, s, backgrounds), img, seeds)


def test_rotation_by_a_given_angle_is_exact(img):
    for angle in (-90.0, 7.5, 33.0, 135.0):
        out = edits.rotate(img, np.random.default_rng(0), angle=angle)
        assert out.label == f"rot{round(angle)}"
        for point in _points(img):
            err = _marker_error(lambda im, a=angle: edits.rotate(im, np.random.default_rng(0), a),
                                img, point)
            assert err is not None and err < 1.5


def test_composed_geometric_chain_transform_is_exact(img, backgrounds):
    # No crop here: a crop followed by an expanding edit can cut the disk inside the frame.
    kinds = sorted(GEOMETRIC - {"crop"})
    _check_markers(
        lambda im, s: random_chain(im, np.random.default_rng(s), backgrounds, (2, 3), kinds),
        img, seeds=range(10), min_checked=20,
    )


def test_chain_with_photometric_edits_keeps_the_marker_within_2px(img, backgrounds):
    # Clipping reweights the marker's difference image a little. No colour jitter: PIL's contrast
    # pivots on the image mean, which the marker shifts, so the whole image would differ.
    kinds = sorted(GEOMETRIC - {"crop"} | {"blur", "jpeg", "gray", "noise", "sharpen"})
    _check_markers(
        lambda im, s: random_chain(im, np.random.default_rng(s), backgrounds, (2, 3), kinds),
        img, seeds=range(10, 20), min_checked=20, tol=2.0,
    )


@pytest.mark.parametrize("name", ["rotate", "perspective", "onto_bg", "aspect", "screenshot"])
def test_crop_then_geometric_edit_composes_exactly(img, backgrounds, name):
    def make(im, seed):
        rng = np.random.default_rng(seed)
        first = edits.crop(im, rng)
        return then(first, apply_edit(name, first.image, rng, backgrounds))

    def disk_survives_crop(seed, point):
        first = edits.crop(img, np.random.default_rng(seed))
        return _inside(first.transform, first.image.size, point)

    _check_markers(make, img, seeds=range(10), min_checked=3, keep=disk_survives_crop)


def test_chain_caps_long_side_and_keeps_transform_exact(img):
    big = img.resize((img.width * 3, img.height * 3), Image.Resampling.BICUBIC)
    out = random_chain(big, np.random.default_rng(0), kinds=["pad"])
    assert max(out.image.size) <= 1024 and out.label == "pad"
    _check_markers(lambda im, s: random_chain(im, np.random.default_rng(s), kinds=["pad"]),
                   big, seeds=range(2))


def test_random_chain_labels_join_with_plus_and_respect_kinds(img, backgrounds):
    prefixes = tuple(PREFIX.get(k, k) for k in EDITS)
    for seed in range(10):
        out = random_chain(img, np.random.default_rng(seed), backgrounds, n_edits=(3, 3))
        parts = out.label.split("+")
        assert len(parts) == 3 and all(p.startswith(prefixes) for p in parts), out.label
        assert "jpeg" not in out.label or parts[-1].startswith("jpeg")
        limited = random_chain(img, np.random.default_rng(seed), kinds=["blur", "jpeg"])
        assert set(p.rstrip("0123456789.") for p in limited.label.split("+")) <= {"blur", "jpeg"}
    a = random_chain(img, np.random.default_rng(5), backgrounds)
    b = random_chain(img, np.random.default_rng(5), backgrounds)
    assert a.label == b.label and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(ValueError):
        random_chain(img, np.random.default_rng(0), kinds=["nope"])


def test_unreadable_background_falls_back_with_a_log_line(img, tmp_path, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="data.edits"):
        out = edits.onto_bg(img, np.random.default_rng(0), backgrounds=[bad])
    assert out.label.startswith("onto_bg") and max(out.image.size) >= max(img.size)
    assert "broken.jpg" in caplog.text


def test_screenshot_of_a_narrow_image_keeps_its_exact_transform() -> None:
    narrow = Image.new("RGB", (40, 600), (200, 30, 30))
    for seed in range(20):  # the frame's bars are taller than a narrow frame is wide
        out = apply_edit("screenshot", narrow, np.random.default_rng(seed))
        corners = map_points(out.transform, [(0, 0), (39, 599)])
        assert (corners >= 0).all() and (corners < out.image.size).all()
