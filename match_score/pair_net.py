"""The learned pair verifier: a small CNN that looks at a pair aligned by its homography.

A verified pair's query thumbnail is warped into the reference frame by the first homography
and both are taken at 64 x 64 pixels with two masks: where the warped query lies, and where
the inliers lie (``match_score.geometry.aligned_pair``). A copy agrees
with its reference over the whole overlap, up to its edits; another photo of the same setting
(a garment on the same floor, a burst shot, a photo inside the same frame) agrees only where
the scene stood still, and its inliers sit there. ``PairNet`` (47 k parameters) says
copy or not copy; its logit is a feature of the fusion (``merge.evidence``).

The weights are trained on training photos only (``calibration.pair_net``, ``make
train-verifier``) and shipped as safetensors, with a JSON beside them saying how they were
made. torch trains it (``build``); the pipeline runs it with ONNX Runtime (``PairVerifier``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common import UserError
from common.io import atomic_path
from match_score.geometry import ALIGNED_CHANNELS, ALIGNED_SIDE

if TYPE_CHECKING:
    import torch

WIDTHS = (16, 32, 48, 64)  # channels of the stride-2 convolutions
MISSING = -8.0  # the logit of a pair the net cannot look at (no homography)
FIT_HINT = "make train-verifier (copydet train-verifier --photos <training photos>)"
BATCH = 256
BN_EPS = 1e-5  # torch's batch norm default


def build(widths: tuple[int, ...] = WIDTHS) -> torch.nn.Module:
    """The net: stride-2 3x3 convolutions (batch norm, ReLU), mean and max pooled, linear."""
    import torch
    from torch import nn

    class PairNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for a, b in zip((len(ALIGNED_CHANNELS), *widths[:-1]), widths, strict=True):
                layers += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(2 * widths[-1], 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)).squeeze(1)

    return PairNet()


class PairVerifier:
    """The shipped net, loaded once and run by ONNX Runtime on one thread (a verification
    worker does not load torch: loky restarts a worker that grows by torch's 300 MB);
    ``logits`` of aligned pairs (``MISSING`` for None)."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(onnx_graph(load_weights(path)), options,
                                                    providers=["CPUExecutionProvider"])

    def logits(self, pairs: list[np.ndarray | None]) -> np.ndarray:
        out = np.full(len(pairs), MISSING, np.float64)
        seen = [i for i, p in enumerate(pairs) if p is not None]
        for start in range(0, len(seen), BATCH):
            index = seen[start:start + BATCH]
            x = np.stack([pairs[i] for i in index]).astype(np.float32)
            out[index] = self.session.run(None, {"pairs": x})[0][:, 0]
        return out


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The weights of a pair verifier file, checked against this version's net; a missing,
    damaged or foreign file is a ``UserError`` naming the command that remakes it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"no pair verifier at {path}: {FIT_HINT}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a safetensors file of the pair verifier ({err}): "
                        f"{FIT_HINT}") from None
    wrong = {k: v for k, v in expected_shapes().items() if k not in state or state[k].shape != v}
    if wrong:
        raise UserError(f"{path} holds another net than this version's pair verifier "
                        f"(e.g. {next(iter(wrong))} is not {next(iter(wrong.values()))}): "
                        f"{FIT_HINT}")
    return state


def onnx_graph(state: dict[str, np.ndarray]) -> bytes:
    """The net of ``build`` as an ONNX model, batch norms folded into the convolutions."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, previous = [], [], "pairs"
    for i in range(len(WIDTHS)):
        conv, bn = f"features.{3 * i}", f"features.{3 * i + 1}"
        scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + BN_EPS)
        weights += [
            numpy_helper.from_array((state[f"{conv}.weight"] * scale[:, None, None, None])
                                    .astype(np.float32), f"w{i}"),
            numpy_helper.from_array((state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale)
                                    .astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"],
                                   kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        previous = f"r{i}"
    weights += [numpy_helper.from_array(state["head.weight"].astype(np.float32), "head_w"),
                numpy_helper.from_array(state["head.bias"].astype(np.float32), "head_b")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["mean"]),
              helper.make_node("GlobalMaxPool", [previous], ["max"]),
              helper.make_node("Concat", ["mean", "max"], ["pooled"], axis=1),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logit"], transB=1)]
    side = ALIGNED_SIDE
    graph = helper.make_graph(
        nodes, "pair_net",
        [helper.make_tensor_value_info("pairs", TensorProto.FLOAT,
                                       ["n", len(ALIGNED_CHANNELS), side, side])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["n", 1])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def expected_shapes(widths: tuple[int, ...] = WIDTHS) -> dict[str, tuple[int, ...]]:
    """The tensors ``build(widths)`` has (batch norm's step count aside), with their shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip((len(ALIGNED_CHANNELS), *widths[:-1]), widths,
                                   strict=True)):
        shapes[f"features.{3 * i}.weight"] = (b, a, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"features.{3 * i + 1}.{name}"] = (b,)
    shapes["head.weight"], shapes["head.bias"] = (1, 2 * widths[-1]), (1,)
    return shapes


def save(net: Any, path: str | Path) -> Path:
    """Write ``net``'s weights (float32 safetensors); return the file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()},
                  str(tmp))
    return Path(path)
