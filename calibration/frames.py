"""Measure what tells a frame from a photo around a detected box (``match_score.frames``).

    python -m calibration.frames --photos ../shared/trainset/photos work/moresplit/fit

Every ``every``-th photo of each folder goes into each query frame of ``data.make_frames``
(screenshot, meme, pad: the box is where the photo lies; pads of noise left out, nothing
matches on noise), and a random box of 30-60 % of its sides is cut out of the photo itself (a
picture pasted onto a photo leaves the photo around the box). Printed, with the threshold
halfway between the photos' 99th and the frames' 1st percentile of each:

- the share of a box's surroundings that their ``LEVELS`` most common grey levels cover
  (``FLAT_SHARE``): frames against photos around a box;
- in the frames, the share of a keypoint's neighbourhood in those levels (``PATCH_SHARE``):
  keypoints outside the box (on the frame) against keypoints inside it (the photo beside
  the frame).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import UserError, cli
from common.config import load_config
from common.images import list_images
from data.edits import apply_edit, map_points
from data.make_frames import QUERY_FRAMES
from local_fea.features import ImageFeatures, extract_image
from match_score.frames import Box, Frame, frame_levels, inside, level_share

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
Shares = dict[str, list[float]]


def placed_box(transform: np.ndarray, size: tuple[int, int]) -> Box:
    """Where a picture of ``size`` lies after an edit's ``transform`` (a translation-scale)."""
    x1, y1, x2, y2 = map_points(transform, [(0, 0), size]).ravel().tolist()
    return x1, y1, x2, y2


def noise(img: Image.Image) -> bool:
    """Whether the first row of ``img`` (a pad's, above or beside the photo) is noise."""
    row = np.asarray(img.convert("L"), np.float64)[0]
    return bool(np.abs(np.diff(row)).mean() > 30)


LOCAL_FEA = load_config()["local_fea"]


def described(img: Image.Image, folder: Path) -> ImageFeatures:
    """The local features (keypoints, thumbnail) the pipeline would give ``img``."""
    path = folder / "image.jpg"
    img.save(path, quality=90)
    return extract_image(path, LOCAL_FEA, mirror=False)


def frame_shares(img: Image.Image, box: Box, folder: Path, found: Shares) -> float:
    """The surroundings' share for ``img`` framed around ``box``; the keypoints' shares go to
    ``found`` (``on frame``, ``photo beside``)."""
    features = described(img, folder)
    levels, surroundings = frame_levels(features.thumb, box, features.size)
    frame = Frame(box, level_share(levels, features.thumb), features.size)
    points = features.views["orig"][0][:, :2]
    shares, within = frame.share_at(points), inside(points, box)
    found["on frame"] += shares[~within].tolist()
    found["photo beside"] += shares[within].tolist()
    return surroundings


def measure(photos: Sequence[Path], seed: int = 0) -> tuple[Shares, Shares]:
    """(surroundings' shares by frame kind and for photos, keypoints' shares)."""
    rng = np.random.default_rng(seed)
    around: Shares = {k: [] for k in (*QUERY_FRAMES, "photo")}
    keypoints: Shares = {"on frame": [], "photo beside": []}
    with tempfile.TemporaryDirectory() as tmp:
        for path in tqdm(photos, desc="frames", unit="photo"):
            with Image.open(path) as im:
                photo = im.convert("RGB")
            photo.thumbnail((480, 480))
            for kind in QUERY_FRAMES:
                edited = apply_edit(kind, photo, rng)
                if kind == "pad" and noise(edited.image):
                    continue
                box = placed_box(edited.transform, photo.size)
                around[kind].append(frame_shares(edited.image, box, Path(tmp), keypoints))
            w, h = photo.size
            bw, bh = w * rng.uniform(0.3, 0.6), h * rng.uniform(0.3, 0.6)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            features = described(photo, Path(tmp))
            around["photo"].append(frame_levels(features.thumb, (x, y, x + bw, y + bh),
                                                features.size)[1])
    return around, keypoints


def table(shares: Shares, what: str, photo: str) -> str:
    """Percentiles of each kind, and the threshold between ``photo`` and the others."""
    lines = [f"| {what} | n | " + " | ".join(f"p{p}" for p in PERCENTILES) + " |",
             "|---|---|" + "---|" * len(PERCENTILES)]
    for kind, values in shares.items():
        cells = " | ".join(f"{v:.2f}" for v in np.percentile(values, PERCENTILES))
        lines.append(f"| {kind} | {len(values)} | {cells} |")
    frames = np.concatenate([v for k, v in shares.items() if k != photo])
    threshold = (np.percentile(shares[photo], 99) + np.percentile(frames, 1)) / 2
    return "\n".join([*lines, f"threshold: {threshold:.2f}"])


def report(folders: Sequence[Path], every: int) -> str:
    """Both tables for every ``every``-th photo of ``folders``."""
    photos = [p for folder in folders for p in list(list_images(folder).paths)[::every]]
    if not photos:
        raise UserError(f"no photos in {', '.join(map(str, folders))}: give training photos")
    around, keypoints = measure(photos)
    return "\n\n".join([table(around, "around the box (FLAT_SHARE)", "photo"),
                        table(keypoints, "a keypoint's neighbourhood (PATCH_SHARE)",
                              "photo beside")])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, type=Path, nargs="+",
                        help="folders of training photos")
    parser.add_argument("--every", type=int, default=2, help="use every n-th photo")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: report(args.photos, args.every))


if __name__ == "__main__":
    raise SystemExit(main())
