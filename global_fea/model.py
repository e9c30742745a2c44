"""The global descriptor network: a timm backbone, pooling, an optional projection, L2 norm.

Any timm model name works (``timm.create_model(arch, pretrained=False)``: nothing is ever
fetched from a hub); its feature map, in whatever layout the model returns it (NCHW for
CNNs, NHWC for Swin, tokens for ViTs), is pooled with GeM (``p`` = 3, as SSCD), average or
max pooling, optionally projected by a linear layer (trained by ``global_fea.train``) and
L2-normalised. ``preprocess`` turns uint8 image batches into the network's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common import UserError

POOLS = ("gem", "avg", "max")


@dataclass
class ModelConf:
    """What defines a descriptor network (the ``global_fea`` keys of the same names)."""

    arch: str = "efficientnet_lite0"
    pool: str = "gem"
    gem_p: float = 3.0
    proj_dim: int = 0  # 0: the pooled backbone features themselves
    image_size: int = 224  # images are resized to image_size x image_size
    mean: Sequence[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: Sequence[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> ModelConf:
        """The model keys of a configuration section (other keys are ignored)."""
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def gem(x: torch.Tensor, p: float, dims: tuple[int, ...], eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over ``dims`` (inputs clamped to ``eps``, as in the paper)."""
    return x.clamp(min=eps).pow(p).mean(dim=dims).pow(1.0 / p)


class GlobalDescriptor(nn.Module):
    """Image batch (N, 3, S, S), preprocessed -> L2-normalised descriptors (N, dim)."""

    def __init__(self, conf: ModelConf):
        super().__init__()
        if conf.pool not in POOLS:
            raise UserError(f"global_fea.pool must be one of {POOLS}, not {conf.pool!r}")
        self.conf = conf
        try:  # no hub download: the weights come from global_fea.weights
            self.backbone = timm.create_model(conf.arch, pretrained=False, num_classes=0,
                                              global_pool="")
        except RuntimeError as err:
            raise UserError(f"global_fea.arch: {err} (see timm.list_models())") from None
        width = self.backbone.num_features
        self.head = nn.Linear(width, conf.proj_dim) if conf.proj_dim else nn.Identity()
        self.dim = conf.proj_dim or width
        self.register_buffer("mean", torch.tensor(conf.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(conf.std).view(1, 3, 1, 1), persistent=False)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C) from a feature map in the backbone's layout."""
        if feats.ndim == 4:
            channels_last = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
            dims = (1, 2) if channels_last else (2, 3)
        elif feats.ndim == 3:  # tokens (N, L, C)
            dims = (1,)
        else:
            raise ValueError(f"cannot pool features of shape {tuple(feats.shape)}")
        if self.conf.pool == "gem":
            return gem(feats, self.conf.gem_p, dims)
        if self.conf.pool == "max":
            return feats.amax(dim=dims)
        return feats.mean(dim=dims)

    def preprocess(self, images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> normalised float input on the model's device, channels-last
        (torch's convolutions run about twice as fast so on CPU) or contiguous NCHW."""
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.backbone.forward_features(x))
        return F.normalize(self.head(pooled).float(), dim=1)
