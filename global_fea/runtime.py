"""Where the descriptor network runs: torch, or ONNX Runtime on CPU (``global_fea.runtime``).

On CPU, ONNX Runtime runs the same network markedly faster than eager torch (it folds batch
norms into convolutions and fuses activations; ``bench.bench_pipeline`` measures both). The
network is exported once per model to ``network-<torch version>.onnx`` beside its descriptor
stores (written atomically), and read back on later runs. ``auto`` uses ONNX Runtime on CPU
when it is installed, torch otherwise and always on GPUs.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import UserError
from common.io import atomic_path
from global_fea.model import GlobalDescriptor

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")


def use_onnx(section: dict[str, Any], device: torch.device) -> bool:
    """Whether ``global_fea.runtime`` asks for ONNX Runtime on ``device``."""
    runtime = section["runtime"]
    available = importlib.util.find_spec("onnxruntime") is not None
    if runtime == "onnx":
        if device.type != "cpu":
            raise UserError(f"global_fea.runtime=onnx runs on the CPU only, not on {device}; "
                            "use runtime=auto or torch")
        if not available:
            raise UserError("global_fea.runtime=onnx needs onnxruntime (pip install "
                            "onnxruntime), or use runtime=torch")
    return runtime != "torch" and device.type == "cpu" and available


def export(model: GlobalDescriptor, path: Path) -> Path:
    """Write ``model`` (preprocessed NCHW float batch -> descriptors) as ONNX, atomically."""
    size = model.conf.image_size
    example = torch.zeros(2, 3, size, size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), (example,), str(tmp), input_names=["x"],
                          output_names=["desc"], dynamic_axes={"x": {0: "n"}, "desc": {0: "n"}},
                          dynamo=False, opset_version=17)
    return path


class OnnxDescriptor:
    """The descriptor network in an ONNX Runtime session: called like ``GlobalDescriptor``
    (a preprocessed batch in, descriptors out), on ``threads`` CPU threads."""

    def __init__(self, model: GlobalDescriptor, folder: Path, threads: int):
        import onnxruntime as ort

        path = Path(folder) / f"network-{torch.__version__.split('+')[0]}.onnx"
        if not path.exists():
            log.info("exporting the descriptor network to %s", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            export(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.model = model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> the network's normalised float input, contiguous NCHW."""
        return self.model.preprocess(images).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.numpy(), np.float32)
        return torch.from_numpy(self.session.run(None, {"x": x})[0])
