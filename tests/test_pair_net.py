"""The learned pair verifier: aligned pairs, the shipped net offline, and the look-alikes and
frames it must keep under the copies, end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import REPO_ROOT, load_config
from common.io import read_csv
from data.edits import random_chain
from data.make_frames import framed, poster, text_page, web_page
from data.make_lookalike import made_pair
from match_score.geometry import ALIGNED_CHANNELS, ALIGNED_SIDE, Verification, verify
from match_score.pair_net import MISSING, PairVerifier, build, save
from tests.conftest import demo_photo, demo_references, described, offline_env, python
from tests.test_pipeline import run_pipeline

OPERATING = 0.5  # a calibrated probability: below it a pair is not called a copy


def _verified(query: Image.Image, ref: Image.Image, tmp: Path) -> Verification:
    conf = load_config()
    q, r = described(query, tmp, "q", True), described(ref, tmp, "r", False)
    return verify(q.views["orig"], r.views["orig"], (q.thumb, q.size), (r.thumb, r.size),
                  conf["match_score"], conf["local_fea"]["short_side"])


def _copy_and_look_alike(seed: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(reference, an edited copy of it, another garment on its backdrop) from demo photos."""
    rng = np.random.default_rng(seed)
    bg, a, b = (demo_photo(int(i), 640) for i in rng.choice(len(demo_references()), 3, False))
    ref, look_alike = made_pair(bg, (a, b), rng)
    copy = random_chain(ref, rng, (), (2, 2), ("crop", "color", "jpeg")).image
    return ref, copy, look_alike


def test_an_aligned_copy_lies_on_its_reference(tmp_path: Path) -> None:
    """A crop of a photo, aligned by its homography, agrees with the reference wherever it
    lies; the inlier map is inside where it lies."""
    ref = demo_photo(3, 640)
    w, h = ref.size
    query = ref.crop((w // 5, h // 6, w - w // 8, h - h // 10)).resize((400, 300))
    v = _verified(query, ref, tmp_path)
    assert v.aligned is not None and v.inliers >= 30
    assert v.aligned.shape == (len(ALIGNED_CHANNELS), ALIGNED_SIDE, ALIGNED_SIDE)
    reference, warped, overlap, inliers = v.aligned.astype(np.float32)
    inside = overlap > 0
    assert 0.45 < inside.mean() < 0.8  # the crop covers about 0.64 of the reference
    assert np.corrcoef(reference[inside], warped[inside])[0, 1] > 0.9
    assert (inliers > 0.5).any() and not (inliers[~inside] > 0.5).any()
    other = _verified(demo_photo(4, 640), ref, tmp_path)
    assert other.aligned is None or np.corrcoef(
        other.aligned[0][other.aligned[2] > 0], other.aligned[1][other.aligned[2] > 0])[0, 1] < 0.5


def test_the_pipeline_runs_the_net_torch_trained(tmp_path: Path) -> None:
    """ONNX Runtime, from the safetensors file, gives torch's logits (batch norms with their
    running statistics, on real aligned pairs and on noise)."""
    import torch

    net = build()
    with torch.no_grad():  # batch norms with statistics of their own, not the identity
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    net.eval()
    ref, copy, look_alike = _copy_and_look_alike(0)
    pairs = [_verified(q, ref, tmp_path).aligned for q in (copy, look_alike)]
    noise = np.random.default_rng(0).normal(size=(5, 4, ALIGNED_SIDE, ALIGNED_SIDE))
    x = np.stack([p for p in pairs if p is not None] + list(noise.astype(np.float16)))
    with torch.inference_mode():
        expected = net(torch.from_numpy(x.astype(np.float32))).numpy()
    got = PairVerifier(save(net, tmp_path / "net.safetensors")).logits(list(x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_pair_without_homography_gets_the_missing_logit(tmp_path: Path) -> None:
    net = build()
    path = save(net, tmp_path / "net.safetensors")
    logits = PairVerifier(path).logits([None, np.zeros((4, ALIGNED_SIDE, ALIGNED_SIDE),
                                                       np.float16)])
    assert logits[0] == MISSING and np.isfinite(logits[1]) and logits[1] != MISSING


def test_a_foreign_or_damaged_weights_file_is_a_user_error(tmp_path: Path) -> None:
    from common import UserError

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a safetensors file"):
        PairVerifier(junk)
    with pytest.raises(UserError, match="make train-verifier"):
        PairVerifier(tmp_path / "none.safetensors")
    other = save(build((8, 8, 8, 8)), tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="another net"):
        PairVerifier(other)


SCRIPT = """
import json, sys
import numpy as np
from common.config import REPO_ROOT, load_config
from match_score.pair_net import PairVerifier
net = PairVerifier(REPO_ROOT / load_config()["match_score"]["pair_model"])
pairs = np.load(sys.argv[1])
print(json.dumps(net.logits(list(pairs)).tolist()))
"""


def test_the_shipped_verifier_loads_offline_and_puts_copies_above_look_alikes(
        tmp_path: Path) -> None:
    """The shipped weights load with every network connection refused, and the net says a
    copy is more of a copy than another garment on the same backdrop, photo by photo."""
    pairs = []
    for seed in range(4):
        ref, copy, look_alike = _copy_and_look_alike(seed)
        for query in (copy, look_alike):
            v = _verified(query, ref, tmp_path)
            pairs.append(v.aligned if v.aligned is not None else
                         np.zeros((4, ALIGNED_SIDE, ALIGNED_SIDE), np.float16))
    np.save(tmp_path / "pairs.npy", np.stack(pairs))
    done = subprocess.run([python(), "-c", SCRIPT, str(tmp_path / "pairs.npy")],
                          env={**offline_env(), "NO_NETWORK_LOG": str(tmp_path / "net.log")},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = np.array(json.loads(done.stdout))
    copies, look_alikes = logits[0::2], logits[1::2]
    assert (copies > look_alikes).all(), logits
    assert (copies > 0).all(), logits
    assert not (tmp_path / "net.log").exists() or not (tmp_path / "net.log").read_text()


@pytest.fixture(scope="module")
def backdrop_and_frames(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], float]:
    """One pipeline run: references are a garment on a backdrop, web pages / posters / text
    pages made from demo photos, and more demo photos; queries are an edited copy of the
    garment, another garment on the same backdrop, other photos in meme / screenshot frames
    (no copy), and one framed copy of a page's photo. The fused score of every pair."""
    tmp = tmp_path_factory.mktemp("pair_net_e2e")
    refs, queries = tmp / "refs", tmp / "queries"
    refs.mkdir()
    queries.mkdir()
    ref, copy, look_alike = _copy_and_look_alike(1)
    ref.save(refs / "garment.jpg", quality=95)
    copy.save(queries / "garment_copy.jpg", quality=90)
    look_alike.save(queries / "other_garment.jpg", quality=90)
    rng = np.random.default_rng(5)
    for i, render in enumerate((web_page, poster, text_page)):
        render(demo_photo(10 + i, 600), rng).save(refs / f"page{i}.jpg", quality=95)
    for i in range(20, 26):
        demo_photo(i, 640).save(refs / f"photo{i}.jpg", quality=95)
    for i in range(4):
        framed(demo_photo(30 + i, 600), rng, "frame_only").image.save(
            queries / f"frame_only{i}.jpg", quality=90)
    framed(demo_photo(11, 600), rng, "framed_copy").image.save(queries / "framed_copy.jpg",
                                                            quality=90)
    out = run_pipeline(queries, refs, tmp / "work", tmp / "submission.csv")
    return {(r["query_id"], r["reference_id"]): float(r["score"]) for r in read_csv(out)}


@pytest.mark.slow
def test_two_garments_on_one_backdrop_score_below_the_copy(
        backdrop_and_frames: dict[tuple[str, str], float]) -> None:
    scores = backdrop_and_frames
    copy = scores.get(("garment_copy", "garment"), 0.0)
    other = scores.get(("other_garment", "garment"), 0.0)
    assert copy > OPERATING > other, (copy, other)


@pytest.mark.slow
def test_a_frame_only_pair_scores_below_the_operating_threshold(
        backdrop_and_frames: dict[tuple[str, str], float]) -> None:
    scores = backdrop_and_frames
    frame_only = {p: s for p, s in scores.items() if p[0].startswith("frame_only")}
    assert all(s < OPERATING for s in frame_only.values()), frame_only
    assert scores.get(("framed_copy", "page1"), 0.0) > OPERATING  # the control: a real copy
