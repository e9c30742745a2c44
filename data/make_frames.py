"""Build the frame benchmark: framed queries against references that are pages and posters.

    python -m data.make_frames --photos ../shared/trainset/more_photos --out work/frames

The references are photos rendered into web pages, posters and text-heavy pictures
(``web_page``, ``poster``, ``text_page``: header bars, titles, paragraphs, a sidebar), in
frames and words unlike the query frames of ``data.edits`` (``screenshot``, ``meme``,
``pad``; the one offline font is the same). The queries:

- ``frame_only``: a photo that is in no reference, inside a screenshot, meme or pad frame. It
  is no copy: all it shares with a reference is frame-like content (flat bars, text);
- ``page_copy``: a reference lightly edited (crop, scale, colour, JPEG, ...): a copy;
- ``framed_copy``: the photo of a reference inside a screenshot, meme or pad frame: it holds
  part of the reference, so it is a copy too.

The layout is ``data.make_benchmark``'s (``gt.csv`` last); photos are drawn with the seed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import cli
from data.edits import Edited, apply_edit, builtin_font, random_chain, random_colour, random_words
from data.make_benchmark import Query, clear_outputs, write_benchmark
from data.make_lookalike import LIGHT_KINDS
from data.photos import load_photo, readable_photos

log = logging.getLogger(__name__)

QUERY_FRAMES = ("screenshot", "meme", "pad")
PAGE_WORDS = (  # none of data.edits.WORDS, the query frames' words
    "about", "account", "article", "blog", "cart", "city", "contact", "event", "garden",
    "help", "home", "kitchen", "menu", "music", "open", "order", "page", "price", "privacy",
    "read", "recipe", "search", "season", "shop", "store", "story", "team", "travel",
    "weather", "welcome", "week", "winter",
)
Rng = np.random.Generator


def _words(rng: Rng, lo: int, hi: int) -> str:
    return random_words(rng, lo, hi, PAGE_WORDS)


def _lines(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rng: Rng, size: int,
           ink: tuple[int, int, int]) -> None:
    """Paragraphs of random words filling ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    font = builtin_font(size)
    y = y0
    while y + size < y1:
        line = _words(rng, 3, 12)
        while line and draw.textlength(line, font=font) > x1 - x0:
            line = line.rsplit(" ", 1)[0] if " " in line else ""
        draw.text((x0, y), line, fill=ink, font=font)
        y += int(size * (1.5 if rng.random() < 0.85 else 3.0))  # a blank line now and then


def _colour(rng: Rng, dark: bool) -> tuple[int, int, int]:
    return random_colour(rng, *((20, 110) if dark else (150, 245)))


def web_page(photo: Image.Image, rng: Rng) -> Image.Image:
    """A page: a coloured header with a name and links, a title, the photo, paragraphs and a
    sidebar of boxes."""
    width = int(rng.integers(760, 980))
    header, margin = int(rng.integers(48, 90)), int(rng.integers(24, 48))
    side = int(width * rng.uniform(0.22, 0.3))
    content = width - side - 3 * margin
    shot = photo.copy()
    shot.thumbnail((content, int(content * 0.9)))
    title = int(rng.integers(26, 40))
    height = header + 2 * margin + title * 2 + shot.height + int(rng.integers(260, 520))
    page = Image.new("RGB", (width, height), _colour(rng, False) if rng.random() < 0.3
                     else (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, width, header), fill=_colour(rng, True))
    draw.text((margin, header // 3), _words(rng, 1, 2).upper(), fill=(255, 255, 255),
              font=builtin_font(header // 3))
    for i in range(int(rng.integers(3, 6))):
        draw.text((width - side + i * side // 5, header // 2), _words(rng, 1, 1),
                  fill=(230, 230, 230), font=builtin_font(13))
    y = header + margin
    draw.text((margin, y), _words(rng, 3, 7).capitalize(), fill=(20, 20, 20),
              font=builtin_font(title))
    y += title * 2
    page.paste(shot, (margin, y))
    _lines(draw, (margin, y + shot.height + margin, margin + content, height - margin), rng,
           int(rng.integers(13, 18)), (60, 60, 60))
    box_ink = _colour(rng, False)
    for top in range(header + margin, height - 120, int(rng.integers(140, 220))):
        draw.rectangle((width - side - margin, top, width - margin, top + 100), fill=box_ink)
        _lines(draw, (width - side - margin + 8, top + 8, width - margin - 8, top + 92), rng,
               12, (40, 40, 40))
    return page


def poster(photo: Image.Image, rng: Rng) -> Image.Image:
    """A poster: the photo full width, a coloured band with a large title, small print."""
    width = int(rng.integers(600, 820))
    shot = photo.resize((width, round(photo.height * width / photo.width)))
    band, foot = int(rng.integers(110, 190)), int(rng.integers(50, 90))
    page = Image.new("RGB", (width, shot.height + band + foot), _colour(rng, True))
    top = rng.random() < 0.5
    page.paste(shot, (0, band if top else 0))
    draw = ImageDraw.Draw(page)
    y = 0 if top else shot.height
    draw.text((width // 2, y + band // 2), _words(rng, 1, 3).upper(), fill=(255, 255, 255),
              font=builtin_font(band // 3), anchor="mm")
    _lines(draw, (20, page.height - foot + 10, width - 20, page.height - 5), rng, 14,
           (220, 220, 220))
    return page


def text_page(photo: Image.Image, rng: Rng) -> Image.Image:
    """Mostly text: two columns of paragraphs with the photo small in one of them."""
    width, height = int(rng.integers(700, 900)), int(rng.integers(900, 1200))
    page = Image.new("RGB", (width, height), (250, 248, 240))
    draw = ImageDraw.Draw(page)
    column = (width - 90) // 2
    shot = photo.copy()
    shot.thumbnail((column, column))
    x = 30 if rng.random() < 0.5 else 60 + column
    y = int(rng.integers(60, height - shot.height - 60))
    page.paste(shot, (x, y))
    other = 90 + column - x  # the column without the photo
    spans = [(x, 30, y - 20), (x, y + shot.height + 20, height - 30), (other, 30, height - 30)]
    for x0, y0, y1 in sorted(spans, key=lambda span: span[0]):  # left column first
        if y1 - y0 > 20:
            _lines(draw, (x0, y0, x0 + column, y1), rng, int(rng.integers(12, 16)),
                   (30, 30, 30))
    return page


RENDERERS: dict[str, Callable[[Image.Image, Rng], Image.Image]] = {
    "web_page": web_page, "poster": poster, "text_page": text_page}


def framed(img: Image.Image, rng: Rng, label: str) -> Edited:
    """``img`` inside one of the query frames, labelled ``<label>+<frame>``."""
    edited = apply_edit(str(rng.choice(QUERY_FRAMES)), img, rng)
    return replace(edited, label=f"{label}+{edited.label}")


def make_frames(photos: str | Path, out: str | Path, n_refs: int = 120,
                n_frame_only: int = 100, n_page_copies: int = 60, n_framed_copies: int = 40,
                seed: int = 7, max_side: int = 800, force: bool = False) -> Path:
    """Build the frame benchmark of the module docstring in ``out``; return ``out``."""
    out = Path(out)
    pool = readable_photos(photos)
    if n_refs + n_frame_only > len(pool):
        raise ValueError(f"need {n_refs + n_frame_only} photos, but only {len(pool)} are "
                         "readable")
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    ref_photos, other = order[:n_refs], order[n_refs:n_refs + n_frame_only]
    kinds = list(RENDERERS)
    styles = [kinds[i % len(kinds)] for i in range(n_refs)]
    clear_outputs(out, force)
    pages = [RENDERERS[style](load_photo(p, max_side), np.random.default_rng([seed, 1, i]))
             for i, (style, p) in enumerate(zip(styles, ref_photos, strict=True))]
    queries: list[Query] = [(None, p) for p in other]
    queries += [(int(i), ("page", int(i))) for i in rng.choice(n_refs, n_page_copies, False)]
    queries += [(int(i), ("photo", int(i))) for i in rng.choice(n_refs, n_framed_copies, False)]
    queries = [queries[i] for i in rng.permutation(len(queries))]

    def edit(q: int, source: object) -> Edited:
        q_rng = np.random.default_rng([seed, 2, q])
        if isinstance(source, Path):
            return framed(load_photo(source, max_side), q_rng, "frame_only")
        kind, i = source
        if kind == "photo":
            return framed(load_photo(ref_photos[i], max_side), q_rng,
                          f"framed_copy+{styles[i]}")
        edited = random_chain(pages[i], q_rng, (), (1, 2), LIGHT_KINDS)
        return replace(edited, label=f"page_copy+{styles[i]}+{edited.label}")

    write_benchmark(out, pages, queries, lambda page: page, edit, "frame set")
    log.info("wrote %d references (%s) and %d queries to %s", len(pages),
             ", ".join(f"{styles.count(k)} {k}" for k in kinds), len(queries), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of source photos")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder to write")
    parser.add_argument("--refs", type=int, default=120, help="pages, posters, text pages")
    parser.add_argument("--frame-only", type=int, default=100,
                        help="framed photos that are in no reference")
    parser.add_argument("--page-copies", type=int, default=60)
    parser.add_argument("--framed-copies", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: make_frames(
        args.photos, args.out, args.refs, args.frame_only, args.page_copies,
        args.framed_copies, args.seed, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
