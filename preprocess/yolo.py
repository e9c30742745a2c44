"""ultralytics YOLO, kept offline: nothing is downloaded and nothing leaves the machine.

Import ultralytics only through ``ultralytics_offline()``. Before ultralytics is first imported
it sets ``YOLO_OFFLINE`` (ultralytics' online check then answers "offline", which turns off
its telemetry, update checks and platform sync) and ``YOLO_CONFIG_DIR`` (its settings file goes
to a folder of ours, not the user's home), and ``YOLO_AUTOINSTALL=false`` (never pip-install a
missing package). It then undoes or replaces what would still reach the internet:

- importing ultralytics replaces ``PIL.Image.open`` by a version that, on any file PIL cannot
  identify, tries to pip-install a HEIF plugin and then fails with ModuleNotFoundError; that
  would turn a corrupt query into a crash of the whole process, so PIL's own ``open`` is put
  back;
- ``check_font``, which fetches Arial.ttf whenever a dataset is checked or a plot drawn, by a
  lookup of local fonts only (ultralytics falls back to PIL's built-in font);
- ``check_amp``, which downloads reference weights to test mixed precision on a GPU, by
  "AMP on CUDA, off elsewhere" (training asks for AMP only with ``--amp``).

Models are always built from an architecture yaml (``model_yaml``: ultralytics' bundled
YOLOv8 at a custom scale). Trained weights are a plain fp16 safetensors file with that yaml in
its metadata (``save_weights``/``load_model``): ultralytics' own weight loading, which looks
unknown names up online and unpickles whole objects, is never used. Training passes
``plots=False`` and starts from scratch or from such a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from common import UserError
from common.config import REPO_ROOT, repo_path
from common.io import atomic_path, write_text

DEFAULT_CONFIG_DIR = REPO_ROOT / "work" / "ultralytics"
_patched = False


def _local_font(font: str = "Arial.ttf") -> Path | None:
    """A font file found on this machine, or None (ultralytics then uses PIL's default)."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    name = Path(font).name
    if (USER_CONFIG_DIR / name).exists():
        return USER_CONFIG_DIR / name
    found = [f.fname for f in font_manager.fontManager.ttflist if name in f.fname]
    return Path(found[0]) if found else None


def _amp_without_download(model: Any) -> bool:
    """AMP on CUDA devices (trusted without ultralytics' download-based check), off elsewhere."""
    return next(model.parameters()).device.type == "cuda"


def ultralytics_offline(config_dir: str | Path | None = None):
    """The ultralytics module, imported (once) with every network path switched off."""
    global _patched
    if not _patched:
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "false"
        os.environ.pop("ULTRALYTICS_API_KEY", None)
        folder = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    import ultralytics
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer
    from ultralytics.utils import SETTINGS, checks, patches, plotting

    if not _patched:
        Image.open = patches._image_open  # undo ultralytics' patch of PIL (see module doc)
        for module in (checks, data_utils, plotting):
            module.check_font = _local_font
        trainer.check_amp = _amp_without_download
        off = {"sync": False, "api_key": "", "clearml": False, "comet": False, "dvc": False,
               "mlflow": False, "raytune": False, "tensorboard": False, "wandb": False,
               "vscode_msg": False, "openvino_msg": False}
        changed = {k: v for k, v in off.items() if k in SETTINGS and SETTINGS[k] != v}
        if changed:
            SETTINGS.update(changed)
        _patched = True
    return ultralytics


def set_threads(n: int) -> None:
    """CPU threads of torch, also for ultralytics, which resets them to cores - 1 whenever it
    selects the CPU device."""
    import torch
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = n
    torch.set_num_threads(n)


def model_yaml(out: str | Path, base: str = "yolov8.yaml", depth: float = 0.33,
               width: float = 0.125, max_channels: int = 1024) -> Path:
    """Write ultralytics' bundled architecture ``base`` at a custom scale, with one class."""
    ultralytics_offline()
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(base)
    cfg.update(nc=1, scales={"custom": [depth, width, max_channels]}, scale="custom")
    cfg.pop("yaml_file", None)
    return write_text(out, yaml.safe_dump(cfg, sort_keys=False))


def save_weights(model: Any, out: str | Path) -> Path:
    """Write a detection model's weights (fp16) with its architecture yaml in the metadata."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    cfg = {k: v for k, v in model.yaml.items() if k != "yaml_file"}  # no local paths
    architecture = yaml.safe_dump(cfg, sort_keys=False)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"architecture": architecture})
    return Path(out)


def load_model(weights: str | Path):
    """A YOLO model built from the architecture stored with ``weights`` (a ``save_weights``
    file on this machine), with those weights loaded."""
    from safetensors import SafetensorError, safe_open

    path = repo_path(weights)
    if not path.is_file():
        raise UserError(f"detector weights not found: {weights} (train them with "
                        "`make train-detector`, see README)")
    try:
        with safe_open(str(path), "pt") as f:
            architecture = (f.metadata() or {}).get("architecture")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise UserError(f"detector weights {path} are not a safetensors file: {err}") from None
    if not architecture:
        raise UserError(f"detector weights {path} carry no architecture: export them with "
                        "`python -m preprocess.train`")
    yolo = ultralytics_offline()
    name = hashlib.sha1(architecture.encode()).hexdigest()[:12]
    cfg = write_text(Path(os.environ["YOLO_CONFIG_DIR"]) / f"detector-{name}.yaml", architecture)
    model = yolo.YOLO(str(cfg), task="detect")
    try:
        model.model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"detector weights {path} do not fit their architecture: {err}") from None
    return model
