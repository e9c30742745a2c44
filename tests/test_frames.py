"""Inliers on a frame around a query's picture are no evidence for the picture: two different
photos in one meme frame share the caption, a copy inside the frame shares the photo; and a
photo around a pasted picture is no frame (it may be the copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import UserError
from common.config import load_config
from data.edits import apply_edit
from match_score.frames import Box, Frame
from match_score.geometry import FIELDS, Verification, verify
from match_score.score import ScoreModel, evidence_inliers
from match_score.verify import count_frame_inliers, match_root
from tests.conftest import demo_photo, described

CONF = load_config()


def _meme(photo: Image.Image, seed: int) -> tuple[Image.Image, Box]:
    """``photo`` under a meme caption (the same caption for the same seed) and its box."""
    edited = apply_edit("meme", photo, np.random.default_rng(seed))
    corners = edited.transform @ np.array([[0, 0, 1], [*photo.size, 1]], np.float64).T
    (x1, x2), (y1, y2) = corners[0] / corners[2], corners[1] / corners[2]
    return edited.image, (x1, y1, x2, y2)


def _verified(query: Image.Image, ref: Image.Image, box: Box, tmp: Path,
              view: str = "orig") -> Verification:
    """``query`` (its ``view``) verified against ``ref`` as the stage does, ``box`` the
    detector's box in the query."""
    q, r = described(query, tmp, "q", True), described(ref, tmp, "r", False)
    thumb = q.thumb[:, ::-1] if view == "mirror" else q.thumb
    v = verify(q.views[view], r.views["orig"], (thumb, q.size), (r.thumb, r.size),
               CONF["match_score"], CONF["local_fea"]["short_side"])
    count_frame_inliers(v, q, r, view, (box, None))
    return v


def _score(v: Verification) -> float:
    model = ScoreModel.load(CONF["match_score"]["score_model"])
    return float(model.predict([dict(zip(FIELDS, v.row(), strict=True))])[0])


def test_a_shared_caption_is_frame_and_a_framed_copy_is_evidence(tmp_path: Path) -> None:
    a = demo_photo(5, 480).resize((480, 360))
    b = demo_photo(6, 480).resize((480, 360))
    query, box = _meme(a, seed=7)
    page, _ = _meme(b, seed=7)  # another photo under the very same caption

    shared_caption = _verified(query, page, box, tmp_path)
    assert shared_caption.inliers >= 8  # the caption matches, as words in one font do
    assert shared_caption.frame_inliers >= 0.9 * shared_caption.inliers
    unframed = Verification(**{**shared_caption.__dict__, "frame_inliers": 0})
    assert _score(unframed) > 0.5 > _score(shared_caption)  # the evidence was all caption

    copy = _verified(query, a, box, tmp_path)
    assert copy.inliers >= 30 and copy.frame_inliers <= 0.05 * copy.inliers
    assert _score(copy) > 0.9


def test_a_photo_around_a_pasted_picture_is_evidence(tmp_path: Path) -> None:
    background = demo_photo(7, 480)
    query = background.copy()
    w, h = query.size
    box = (w * 0.3, h * 0.3, w * 0.7, h * 0.7)
    query.paste(demo_photo(8, 480).resize((round(w * 0.4), round(h * 0.4))),
                (round(box[0]), round(box[1])))
    copy = _verified(query, background, box, tmp_path)  # the copied photo lies around the box
    assert copy.inliers >= 30 and copy.frame_inliers == 0
    assert _score(copy) > 0.9


def test_a_photo_beside_a_flat_pad_is_evidence(tmp_path: Path) -> None:
    """A padded copy with a picture pasted over it: the surroundings of the pasted picture's
    box are mostly pad, a frame, but the photo's inliers beside it are no frame inliers."""
    photo = demo_photo(9, 480)
    w, h = photo.size
    padded = Image.new("RGB", (w + 240, h + 160), (250, 250, 250))
    padded.paste(photo, (120, 80))
    box = (120 + w * 0.25, 80 + h * 0.25, 120 + w * 0.75, 80 + h * 0.75)
    padded.paste(demo_photo(10, 480).resize((w // 2, h // 2)), (round(box[0]), round(box[1])))
    copy = _verified(padded, photo, box, tmp_path)
    assert copy.inliers >= 30 and copy.frame_inliers <= 0.1 * copy.inliers
    assert _score(copy) > 0.9


def test_a_frame_follows_the_mirror_view() -> None:
    nearby = np.zeros((10, 20), np.float32)
    nearby[:, 15:] = 1.0  # the frame's levels fill the right quarter
    frame = Frame((10.0, 40.0, 110.0, 90.0), nearby, (200, 100))
    points = np.array([[20.0, 50.0], [170.0, 50.0], [60.0, 10.0], [20.0, 10.0]])
    flipped = np.c_[200 - points[:, 0], points[:, 1]]
    # in the box; on the frame; outside the box but on photo; idem
    assert frame.covers(points).tolist() == [False, True, False, False]
    assert frame.mirrored().covers(flipped).tolist() == [False, True, False, False]


def test_a_side_caption_is_frame_in_the_mirror_view(tmp_path: Path) -> None:
    """A caption on one side: the query is the page's mirror image around another photo, so
    only its mirror view matches the caption; the box must be mirrored with it."""
    a = demo_photo(5, 480).resize((480, 360))
    b = demo_photo(6, 480).resize((480, 360))
    query, (x1, y1, x2, y2) = _meme(a, seed=0)  # caption on top only: turned to the left
    page = _meme(b, seed=0)[0].transpose(Image.Transpose.ROTATE_90)
    turned = query.transpose(Image.Transpose.ROTATE_90)  # (x, y) -> (y, width - x)
    box = (y1, query.width - x2, y2, query.width - x1)
    flipped = turned.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # caption on the right
    w = flipped.width
    caption = _verified(flipped, page, (w - box[2], box[1], w - box[0], box[3]), tmp_path,
                        "mirror")
    assert caption.inliers >= 8 and caption.frame_inliers >= 0.7 * caption.inliers  # 0 unmirrored


def test_frames_name_the_outputs_and_a_bad_boxes_file_is_one_line(tmp_path: Path) -> None:
    rows = ["query_id,x1,y1,x2,y2,conf,used_for", "q1,0,10,100,90,0.9,global+local",
            "q2,5,5,50,50,0.3,"]
    boxes, same = tmp_path / "boxes.csv", tmp_path / "same.csv"
    boxes.write_text("\n".join(rows) + "\n")
    same.write_text("\n".join(rows[:2]) + "\n")  # the same boxes of the local branch
    named = {b: match_root(CONF, "search", tmp_path, (b, None)) for b in (None, boxes, same)}
    assert named[boxes] == named[same] != named[None]
    with pytest.raises(UserError, match="no boxes at"):
        match_root(CONF, "search", tmp_path, (tmp_path / "missing.csv", None))
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"is not a boxes\.csv"):
        match_root(CONF, "search", tmp_path, (tmp_path / "other.csv", None))


def test_fewer_than_a_homographys_inliers_off_a_frame_are_no_evidence() -> None:
    rows = [{"inliers": 12, "frame_inliers": f} for f in (10, 8, 0)] + [{"inliers": 3}]
    assert evidence_inliers(rows).tolist() == [0, 4, 12, 3]  # 3 inliers, no frame: as found
