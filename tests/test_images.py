"""Image sets and robust decoding: every kind of bad input gives a clear ImageError."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import (
    DuplicateIdError,
    ImageError,
    list_images,
    read_image,
    resize_short_side,
)
from tests.conftest import demo_references


@pytest.fixture
def rgb() -> Image.Image:
    return Image.open(demo_references()[0]).convert("RGB")


def test_list_images_sorted_ids_and_ignored_files(tmp_path: Path, rgb, caplog) -> None:
    (tmp_path / "sub").mkdir()
    rgb.save(tmp_path / "b.jpg")
    rgb.save(tmp_path / "sub" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        images = list_images(tmp_path, name="set")
    assert images.ids == ("a", "b") and images.name == "set"
    assert images.paths[0].name == "a.png"
    assert [p.name for p in images.ignored] == ["notes.txt"]
    assert "notes.txt" in caplog.text


def test_duplicate_ids_name_both_files(tmp_path: Path, rgb) -> None:
    rgb.save(tmp_path / "x.jpg")
    rgb.save(tmp_path / "x.png")
    with pytest.raises(DuplicateIdError, match=r"x\.jpg.*x\.png|x\.png.*x\.jpg"):
        list_images(tmp_path)


def test_jpeg_draft_decoding_matches_full_decode(tmp_path: Path, rgb) -> None:
    big = rgb.resize((rgb.width * 3, rgb.height * 3))
    big.save(tmp_path / "big.jpg", quality=95)
    fast, size = read_image(tmp_path / "big.jpg", "L", min_side=300)
    full, _ = read_image(tmp_path / "big.jpg", "L")
    assert size == big.size
    assert min(fast.shape) >= 300 and fast.shape[0] < full.shape[0]  # decoded at reduced scale
    a = resize_short_side(fast, 300).astype(float)
    b = resize_short_side(full, 300).astype(float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3.0


def test_zero_byte_corrupt_truncated_and_non_image(tmp_path: Path, rgb) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a picture")
    rgb.save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    cases = [("empty.jpg", "empty file"), ("text.jpg", "not an image"),
             ("truncated.jpg", "cannot decode"), ("garbage.png", "cannot decode|not an image")]
    for name, reason in cases:
        with pytest.raises(ImageError, match=reason) as err:
            read_image(tmp_path / name)
        assert "\n" not in str(err.value)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a huge size (a decompression bomb), with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError, match="too large: 100000x100000"):
        read_image(tmp_path / "bomb.png")


def test_cmyk_16bit_alpha_palette_animated(tmp_path: Path, rgb) -> None:
    expected = np.asarray(rgb.convert("L"), float)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited over white
    rgba.save(tmp_path / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    frames = [rgb, rgb.rotate(90)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    assert np.abs(read_image(tmp_path / "cmyk.jpg")[0] - expected).mean() < 6
    deep, _ = read_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and np.abs(deep - expected).mean() < 1  # scaled, not clipped
    assert (read_image(tmp_path / "alpha.png")[0] == 255).all()
    assert np.abs(read_image(tmp_path / "palette.png")[0] - expected).mean() < 12
    first, size = read_image(tmp_path / "anim.gif", "RGB")
    assert first.shape == (rgb.height, rgb.width, 3) and size == rgb.size


def test_exif_rotation_is_applied(tmp_path: Path, rgb) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    rgb.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    arr, size = read_image(tmp_path / "rotated.jpg", "L", min_side=100)
    assert size == (rgb.height, rgb.width)
    assert arr.shape[1] / arr.shape[0] == pytest.approx(rgb.height / rgb.width, rel=0.05)
    upright = np.asarray(rgb.convert("L").transpose(Image.Transpose.ROTATE_270), float)
    small = np.asarray(Image.fromarray(upright.astype(np.uint8)).resize(arr.shape[::-1]), float)
    assert np.abs(arr - small).mean() < 10


def test_resize_never_upscales() -> None:
    img = np.zeros((100, 200), np.uint8)
    assert resize_short_side(img, 300) is img
    assert resize_short_side(img, 50).shape == (50, 100)


def test_importing_leaves_pil_pixel_limit_alone_and_our_limit_applies(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """Importing common.images used to switch PIL's decompression-bomb check off for the
    whole process; now a larger limit of our own is in force only while we open an image."""
    import subprocess
    import sys

    probe = ("import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; import common.images; "
             "print(before == I.MAX_IMAGE_PIXELS is not None)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[1])
    assert done.stdout.strip() == "True"
    Image.new("L", (100, 100), 90).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is a "bomb" for PIL
    gray, size = read_image(tmp_path / "big.png", "L", max_pixels=20_000)
    assert gray.shape == (100, 100) and size == (100, 100) and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageError, match="over the 5,000 px limit"):
        read_image(tmp_path / "big.png", "L", max_pixels=5_000)
