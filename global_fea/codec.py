"""The trained whitening of global descriptors and the normalisation bank, as stored in
``global_fea.assets`` (trained by ``global_fea.whiten`` on training photos, never on references).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common import UserError
from common.config import file_digest, repo_path
from global_fea.weights import model_name

NONE = "none"


@dataclass
class Codec:
    """A trained whitening chain (or, for ``none``, plain L2 normalisation)."""

    label: str
    index: faiss.Index | None = None

    def out_dim(self, in_dim: int) -> int:
        return self.transforms()[-1].d_out if self.index is not None else in_dim

    def transforms(self) -> list[faiss.VectorTransform]:
        pre = faiss.downcast_index(self.index)
        return [faiss.downcast_VectorTransform(pre.chain.at(i)) for i in range(pre.chain.size())]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened float32 descriptors of raw descriptors ``x`` (n, d)."""
        x = np.ascontiguousarray(x, np.float32)
        if self.index is None:
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        for transform in self.transforms():
            x = transform.apply(x)
        return np.ascontiguousarray(x, np.float32)


def slug(factory: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", factory)


def assets_dir(section: dict[str, Any]) -> Path:
    return repo_path(section["assets"])


def codec_path(section: dict[str, Any]) -> Path:
    return assets_dir(section) / f"{model_name(section)}-{slug(section['whitening'])}.faiss"


def bank_path(section: dict[str, Any]) -> Path:
    """The whitened training-photo descriptors (float16 .npy) for score normalisation."""
    return codec_path(section).with_suffix(".bank.npy")


def _hint(section: dict[str, Any]) -> str:
    return ("train it on the fit part of the training photos (never the references, nor the "
            "calib part the fusion is calibrated on) with `make global-assets`")


def codec_digest(section: dict[str, Any]) -> str:
    """Hash of the trained codec's bytes (``none``: no codec)."""
    if section["whitening"] == NONE:
        return NONE
    path = codec_path(section)
    if not path.exists():
        raise UserError(f"no whitening {section['whitening']!r} for this model at {path}: "
                        + _hint(section))
    return file_digest(path)[:10]


def load_codec(section: dict[str, Any]) -> Codec:
    if section["whitening"] == NONE:
        return Codec(NONE)
    codec_digest(section)  # a clear error when it is missing
    return Codec(section["whitening"], faiss.read_index(str(codec_path(section))))


def load_bank(section: dict[str, Any]) -> np.ndarray:
    """The normalisation bank of this model and whitening (float32, one row per photo)."""
    path = bank_path(section)
    if not path.exists():
        raise UserError(f"no normalisation bank for this model at {path}: " + _hint(section))
    return np.load(path).astype(np.float32)
