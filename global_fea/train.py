"""Fine-tune the global descriptor for copy detection, SSCD-style, on training photos.

    python -m global_fea.train --photos work/trainsplit/fit --out work/train/lite0 \\
        --steps 2000 --batch 32 [--device cuda] [--workers 8]

Self-supervised contrastive learning as in SSCD (Pizzi et al., CVPR 2022): every step draws
``batch`` photos and makes two copies of each with strong DISC21-style edits
(``data.edits.random_chain``: crops, pads, rotations, flips, overlays onto other photos,
text, emoji, colour, blur, JPEG, ...; with probability ``p_clean`` one copy is the photo
itself, as a reference is). The two copies of a photo are positives, every other image of
the batch a negative: InfoNCE over the 2B embeddings (temperature ``temperature``) plus
SSCD's differential-entropy regulariser (``entropy_weight`` x minus the mean log distance of
each embedding to its nearest negative), which spreads descriptors over the sphere.

Starts from ``--init`` (default: the offline ImageNet weights), adds a linear projection to
``proj_dim``, runs on CPU (small smoke runs) or GPU (mixed precision), with DataLoader
workers for the edits. A checkpoint (model, optimiser, step) is written atomically every
``--save-every`` steps and a restarted run continues from it. At the end the descriptor is
exported in fp16 as ``<out>/descriptor.safetensors``, to be used with
``-o global_fea.weights=<file> -o global_fea.proj_dim=<proj_dim>``; the loss of every step is
in ``<out>/log.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import UserError
from common.cli import report_errors
from common.devices import torch_device
from common.images import ImageError, list_images, read_image, resize_long_side
from common.io import atomic_path, read_csv, write_csv
from common.logs import setup_console
from data.edits import random_chain
from global_fea import weights
from global_fea.extract import SPAWN
from global_fea.model import GlobalDescriptor, ModelConf

log = logging.getLogger(__name__)


@dataclass
class TrainConf:
    arch: str = "efficientnet_lite0"
    init: str = weights.IMAGENET  # global_fea.weights value the training starts from
    proj_dim: int = 256
    pool: str = "gem"
    gem_p: float = 3.0
    image_size: int = 224
    steps: int = 2000
    batch: int = 32  # photos per step (2 x batch images)
    lr: float = 2e-4
    head_lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    temperature: float = 0.05
    entropy_weight: float = 10.0
    freeze: float = 0.0  # fraction of the backbone's tensors, from the input on, kept fixed
    p_clean: float = 0.5
    max_edits: int = 3
    seed: int = 0
    device: str = "auto"
    workers: int = 1
    threads: int = 0  # torch CPU threads (0: torch's default)
    save_every: int = 100

    # may differ on a resume: resources, and the number of steps (training goes on further)
    RESUME_MAY_CHANGE = ("device", "workers", "threads", "save_every", "steps")

    def model_conf(self) -> ModelConf:
        return ModelConf(arch=self.arch, pool=self.pool, gem_p=self.gem_p,
                         proj_dim=self.proj_dim, image_size=self.image_size)


LOG_COLUMNS = ["step", "loss", "infonce", "entropy", "lr", "seconds"]


class CopyPairs(Dataset):
    """Item ``n``: two edited copies (uint8 (3, S, S) each) of one photo, seeded by ``n``.

    Photos are visited in a new random order every epoch, so ``n`` alone fixes the photo
    and its edits: a restarted run draws the same images.
    """

    def __init__(self, paths: list[Path], conf: TrainConf, length: int):
        self.paths, self.conf, self.length = paths, conf, length

    def __len__(self) -> int:
        return self.length

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one dataset per run, two epochs at most)
    def order(self, epoch: int) -> np.ndarray:
        """The photos' order in ``epoch``."""
        return np.random.default_rng([self.conf.seed, epoch]).permutation(len(self.paths))

    def photo(self, n: int) -> Image.Image:
        epoch, i = divmod(n, len(self.paths))
        rgb, _ = read_image(self.paths[self.order(epoch)[i]], "RGB",
                            min_side=self.conf.image_size)
        return Image.fromarray(resize_long_side(rgb, 2 * self.conf.image_size))

    def square(self, img: Image.Image) -> torch.Tensor:
        size = self.conf.image_size
        arr = cv2.resize(np.asarray(img.convert("RGB")), (size, size),
                         interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cv2.setNumThreads(1)
        rng = np.random.default_rng([self.conf.seed, n, 1])
        try:
            img = self.photo(n)
        except ImageError:  # an unreadable training photo: a flat grey one instead
            img = Image.new("RGB", (self.conf.image_size,) * 2, (128, 128, 128))
        edit = lambda: random_chain(img, rng, self.paths, (1, self.conf.max_edits),  # noqa: E731
                                    max_side=2 * self.conf.image_size).image
        first = img if rng.random() < self.conf.p_clean else edit()
        return self.square(first), self.square(edit())


def sscd_loss(z: torch.Tensor, temperature: float,
              entropy_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE + entropy regularisation of L2-normalised embeddings ``z`` (2B, d), where rows
    ``i`` and ``i + B`` are the two copies of one photo."""
    z = z.float()
    n = len(z) // 2
    own = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positive = own.roll(n, dims=1)
    logits = (z @ z.T / temperature).masked_fill(own, float("-inf"))
    targets = torch.arange(len(z), device=z.device).roll(n)
    infonce = F.cross_entropy(logits, targets)
    dist = torch.cdist(z, z).masked_fill(own | positive, float("inf"))
    entropy = -torch.log(dist.min(dim=1).values + 1e-8).mean()
    loss = infonce + entropy_weight * entropy
    return loss, {"loss": loss.item(), "infonce": infonce.item(), "entropy": entropy.item()}


def lr_at(step: int, conf: TrainConf) -> float:
    """Linear warm-up, then cosine decay to zero; a factor of the base rates."""
    if step < conf.warmup:
        return (step + 1) / conf.warmup
    progress = (step - conf.warmup) / max(1, conf.steps - conf.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_model(conf: TrainConf) -> GlobalDescriptor:
    """The descriptor with its initial weights; the first ``freeze`` of the backbone's
    tensors (stem and early blocks: generic edges and textures) are not trained."""
    model = weights.load_weights(GlobalDescriptor(conf.model_conf()), conf.init).train()
    params = list(model.backbone.parameters())
    for p in params[:int(conf.freeze * len(params))]:
        p.requires_grad_(False)
    return model


def make_optimizer(model: GlobalDescriptor, conf: TrainConf) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": conf.lr},
        {"params": model.head.parameters(), "lr": conf.head_lr},
    ], weight_decay=conf.weight_decay)


def train_step(model: GlobalDescriptor, optimizer: torch.optim.Optimizer, scaler,
               views: tuple[torch.Tensor, torch.Tensor], conf: TrainConf,
               step: int) -> dict[str, float]:
    """One optimisation step on a batch of copy pairs; return the loss terms."""
    model.train()
    factor = lr_at(step, conf)
    for group, base in zip(optimizer.param_groups, (conf.lr, conf.head_lr), strict=True):
        group["lr"] = base * factor
    x = model.preprocess(torch.cat(views))
    cuda = x.device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.float16) if cuda
                else contextlib.nullcontext())
    with autocast:
        z = model(x)
    loss, parts = sscd_loss(z, conf.temperature, conf.entropy_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return parts


def save_state(path: Path, model, optimizer, scaler, step: int, conf: TrainConf) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "conf": asdict(conf)}, tmp)


def main(conf: TrainConf, photos: str | Path, out: str | Path) -> Path:
    """Train (or resume) under ``out``; return the exported fp16 descriptor."""
    setup_console()
    out = Path(out)
    paths = list(list_images(photos).paths)
    if len(paths) < 2:
        raise UserError(f"need at least 2 training photos in {photos}, found {len(paths)}")
    device = torch.device(torch_device(conf.device, "--device"))
    if conf.threads:
        torch.set_num_threads(conf.threads)
    torch.manual_seed(conf.seed)
    model = make_model(conf).to(device)
    optimizer = make_optimizer(model, conf)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    state_path, start = out / "train_state.pth", 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        changed = {k: (v, getattr(conf, k)) for k, v in state["conf"].items()
                   if k not in conf.RESUME_MAY_CHANGE and v != getattr(conf, k, v)}
        if changed:
            raise UserError(f"{state_path} was trained with other settings (saved, asked): "
                            f"{changed}; give another --out, or the same settings to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
        log.info("resuming %s at step %d", state_path, start)
    data = CopyPairs(paths, conf, conf.steps * conf.batch)
    loader = DataLoader(data, batch_size=conf.batch, num_workers=conf.workers,
                        sampler=range(start * conf.batch, conf.steps * conf.batch),
                        pin_memory=device.type == "cuda", drop_last=True,
                        prefetch_factor=2 if conf.workers else None,
                        multiprocessing_context=SPAWN if conf.workers else None)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.csv"
    logged = read_csv(log_path) if log_path.exists() else []
    write_csv(log_path, LOG_COLUMNS, [[r[c] for c in LOG_COLUMNS] for r in logged
                                      if int(r["step"]) < start])  # steps redone are relogged
    log.info("training %s (%s) on %d photos, steps %d-%d, batch %d, %s", conf.arch,
             conf.init, len(paths), start, conf.steps, conf.batch, device)
    with open(log_path, "a", newline="") as f:
        writer = csv.writer(f)
        t0 = time.time()
        for step, (a, b) in enumerate(loader, start):
            parts = train_step(model, optimizer, scaler, (a.to(device), b.to(device)), conf,
                               step)
            writer.writerow([step, f"{parts['loss']:.5f}", f"{parts['infonce']:.5f}",
                             f"{parts['entropy']:.5f}", f"{lr_at(step, conf):.4f}",
                             f"{time.time() - t0:.1f}"])
            f.flush()
            if step % 10 == 0:
                log.info("step %d: loss %.4f (infonce %.4f, entropy %.4f)", step,
                         parts["loss"], parts["infonce"], parts["entropy"])
            if (step + 1) % conf.save_every == 0 or step + 1 == conf.steps:
                save_state(state_path, model, optimizer, scaler, step + 1, conf)
    export = out / "descriptor.safetensors"
    weights.save(model.eval().cpu(), export, half=True,
                 info={"trained": f"global_fea.train {asdict(conf)} on {photos}"})
    log.info("exported %s (%.1f MB)", export, export.stat().st_size / 1e6)
    return export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", required=True, type=Path,
                        help="training photos (never the references)")
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    for name, default in asdict(TrainConf()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return parser.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    photos, out = args.pop("photos"), args.pop("out")
    report_errors(lambda: main(TrainConf(**args), photos, out))


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from global_fea import train

    train.run_cli()
