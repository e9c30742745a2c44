"""SSCD-style training: the loss, a few CPU steps that lower it, the CLI, resumption."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from global_fea import train, weights
from global_fea.model import GlobalDescriptor, ModelConf
from tests.conftest import python


def test_sscd_loss_is_lower_when_copies_are_closest() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 16), dim=1)
    copies = F.normalize(a + 0.05 * torch.randn(8, 16), dim=1)
    matched, parts = train.sscd_loss(torch.cat([a, copies]), 0.05, 30.0)
    shuffled, _ = train.sscd_loss(torch.cat([a, copies.roll(1, dims=0)]), 0.05, 30.0)
    assert float(matched) < float(shuffled)
    assert np.isfinite(parts["entropy"]) and parts["infonce"] < 1.0


def test_copy_pairs_are_reproducible_edited_squares(photos: Path) -> None:
    conf = train.TrainConf(image_size=64, p_clean=0.0)
    data = train.CopyPairs(sorted(photos.iterdir()), conf, 10)
    first, second = data[3]
    assert first.shape == second.shape == (3, 64, 64) and first.dtype == torch.uint8
    assert not torch.equal(first, second)  # two different edits of one photo
    again = data[3]
    assert torch.equal(again[0], first) and torch.equal(again[1], second)


def test_a_few_cpu_steps_lower_the_loss(photos: Path) -> None:
    torch.manual_seed(0)
    conf = train.TrainConf(image_size=64, batch=6, warmup=1, steps=8, lr=5e-4, head_lr=5e-3,
                           proj_dim=64)
    data = train.CopyPairs(sorted(photos.iterdir()), conf, 6)
    views = tuple(torch.stack(v) for v in zip(*(data[i] for i in range(6)), strict=True))
    model = train.make_model(conf)
    optimizer = train.make_optimizer(model, conf)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    losses = [train.train_step(model, optimizer, scaler, views, conf, step)["loss"]
              for step in range(conf.steps)]
    assert losses[-1] < losses[0]


def test_train_cli_runs_resumes_and_exports_fp16(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [python(), "-m", "global_fea.train", "--photos", str(photos), "--out", str(out),
           "--batch", "3", "--image-size", "64", "--workers", "0", "--warmup", "1",
           "--save-every", "1", "--threads", "2"]
    subprocess.run([*cmd, "--steps", "2"], check=True, capture_output=True)
    subprocess.run([*cmd, "--steps", "3"], check=True, capture_output=True)
    with open(out / "log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [0, 1, 2]  # the second run resumed at step 2
    other = subprocess.run([*cmd, "--steps", "4", "--lr", "1e-3"], capture_output=True,
                           text=True)
    assert other.returncode == 2 and "other settings" in other.stderr  # not a silent mix
    export = out / "descriptor.safetensors"
    assert weights.saved_conf(export)["proj_dim"] == 256
    model = weights.load_weights(GlobalDescriptor(ModelConf(proj_dim=256, image_size=64)),
                                 str(export))
    assert next(model.parameters()).dtype == torch.float32
    with torch.inference_mode():
        z = model(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, 256) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-4)
