"""Where the descriptor network runs: torch, or ONNX Runtime on CPU (``global_fea.runtime``).

On CPU, ONNX Runtime runs the same network about 3x faster than eager torch here (it folds
batch norms into convolutions and fuses activations; ``bench.bench_global``). The network is
exported once with ``torch.onnx.export`` to ``network-<hash>.onnx`` beside its descriptor
stores (written atomically; the hash covers the weights, the model's settings, the torch
version and this module's export version, so a file is never reused for another network),
and every export is checked against torch on a fixed batch before it is used. ``auto`` uses
ONNX Runtime on CPU when it is installed and the export checks out (otherwise it says why and
runs torch); ``onnx`` requires it; GPUs always run torch. On ``n`` cores up to
``MAX_CALLERS`` threads call the network at once, each its own session on its share of the
cores (``cpu_callers``): on 2 cores, two single-thread sessions give 10-15 % more images
per second than one session of two threads (no synchronisation inside a batch, and the
decoding of the next batch overlaps), with the same descriptors, bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import UserError
from common.config import digest
from common.io import atomic_path, clean_stale_tmp
from global_fea.model import GlobalDescriptor

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the export below changes
MIN_COSINE = 0.9999  # ONNX Runtime against torch, on the check batch
MAX_CALLERS = 4  # threads calling the network at once on CPU (each: a batch's activations)


class ExportError(RuntimeError):
    """The network cannot be exported, or its export does not describe as torch does."""


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def use_onnx(section: dict[str, Any], device: torch.device) -> bool:
    """Whether ``global_fea.runtime`` asks for ONNX Runtime on ``device``."""
    runtime = section["runtime"]
    if runtime == "onnx":
        if device.type != "cpu":
            raise UserError(f"global_fea.runtime=onnx runs on the CPU only, not on {device}; "
                            "use runtime=auto or torch")
        if not onnx_available():
            raise UserError("global_fea.runtime=onnx needs onnxruntime (pip install "
                            "onnxruntime), or use runtime=torch")
        return True
    if runtime == "auto" and device.type == "cpu" and not onnx_available():
        log.warning("onnxruntime is not installed: the global descriptors run in torch on the "
                    "CPU, about 3x slower (pip install onnxruntime)")
        return False
    return runtime == "auto" and device.type == "cpu"


def onnx_path(model: GlobalDescriptor, folder: Path) -> Path:
    """The export of ``model`` in ``folder``, named after everything it depends on."""
    sha = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    key = digest(sha.hexdigest(), model.conf.to_dict(), torch.__version__, EXPORT_VERSION)
    return Path(folder) / f"network-{key}.onnx"


def check_batch(model: GlobalDescriptor, n: int = 3) -> torch.Tensor:
    """A fixed, preprocessed input batch (a smooth random image per row)."""
    size = model.conf.image_size
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 8, 8, generator=generator) * 255
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return model.preprocess(images.round().to(torch.uint8), channels_last=False)


def export(model: GlobalDescriptor, path: Path) -> Path:
    """Write ``model`` (preprocessed NCHW float batch -> descriptors) as ONNX, atomically. An
    ``OSError`` (a full disk) is raised as it is: the run stops, it does not fall back to
    torch."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter
        try:
            torch.onnx.export(model.eval(), (check_batch(model, 2),), str(tmp),
                              input_names=["x"], output_names=["desc"],
                              dynamic_axes={"x": {0: "n"}, "desc": {0: "n"}},
                              dynamo=False, opset_version=17)
        except Exception as err:  # any exporter failure: the caller decides what it means
            if isinstance(err, OSError):  # where it writes (a full disk): not the network
                raise
            raise ExportError(f"torch.onnx.export failed: {err}") from err
    return path


class OnnxDescriptor:
    """The descriptor network in an ONNX Runtime session: called like ``GlobalDescriptor``
    (a preprocessed batch in, descriptors out), on ``threads`` CPU threads. ``check``: compare
    it with torch first (off only for another session of a file already checked)."""

    def __init__(self, model: GlobalDescriptor, folder: Path, threads: int, check: bool = True):
        import onnxruntime as ort

        path = onnx_path(model, folder)
        clean_stale_tmp(path.parent)
        if not path.exists():
            log.info("exporting the descriptor network to %s", path)
            export(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # a corrupt or foreign file: the caller decides, as for export
            raise ExportError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.model = model
        if check:
            self.check()

    def check(self) -> None:
        """Raise ``ExportError`` unless this session describes the check batch as torch does."""
        x = check_batch(self.model)
        with torch.inference_mode():
            expected = self.model(x).numpy()
        got = self(x).numpy()
        if got.shape != expected.shape:
            raise ExportError(f"the ONNX export gives descriptors of shape {got.shape}, torch "
                              f"{expected.shape}")
        cosine = (got * expected).sum(1) / np.maximum(
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1), 1e-12)
        if not cosine.min() >= MIN_COSINE:  # NaN fails too
            raise ExportError(f"the ONNX export describes differently from torch (cosine "
                              f"{float(cosine.min()):.6f} < {MIN_COSINE})")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> the network's normalised float input, contiguous NCHW."""
        return self.model.preprocess(images, channels_last=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.numpy(), np.float32)
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def cpu_network(model: GlobalDescriptor, section: dict[str, Any], folder: Path,
                threads: int) -> GlobalDescriptor | OnnxDescriptor:
    """The network as ``global_fea.runtime`` runs it on the CPU: in ONNX Runtime, or ``model``
    itself (``auto``: also when the export fails or does not check out, saying why)."""
    if not use_onnx(section, torch.device("cpu")):
        return model
    try:
        return OnnxDescriptor(model, folder, threads)
    except ExportError as err:
        if section["runtime"] == "onnx":
            raise UserError(f"global_fea.runtime=onnx: {err}; use runtime=torch") from None
        log.warning("%s: the global descriptors run in torch", err)
        return model


def cpu_callers(model: GlobalDescriptor, section: dict[str, Any], folder: Path,
                n_jobs: int) -> list[GlobalDescriptor | OnnxDescriptor]:
    """The network as ``cpu_network`` runs it on ``n_jobs`` cores, once per thread that calls
    it at once: ONNX Runtime sessions sharing the cores out, one per calling thread (at most
    ``MAX_CALLERS``: each holds a batch's activations), or torch on ``n_jobs`` threads of its
    own, for one."""
    torch.set_num_threads(n_jobs)
    callers = max(1, min(n_jobs, MAX_CALLERS))
    threads = [n_jobs // callers + (i < n_jobs % callers) for i in range(callers)]
    first = cpu_network(model, section, folder, threads[0])
    if not isinstance(first, OnnxDescriptor):
        return [first]
    return [first, *(OnnxDescriptor(model, folder, t, check=False) for t in threads[1:])]
