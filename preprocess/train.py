"""Train the overlay detector on the synthetic set and ship its weights.

    python -m preprocess.train --data work/overlay_synth --out preprocess/assets/overlay_yolo.pt

The model is ultralytics' bundled YOLOv8 architecture at a small custom scale (``--width``,
``--depth``; one class), trained from scratch: no pretrained weights exist offline, and
ultralytics is kept from downloading anything (``preprocess.yolo``). Mosaic augmentation is
off, because a mosaic of four photos looks like pastes that nobody labelled; the rest are
ultralytics' defaults (flips, scale, translation, HSV jitter). The best epoch on the val split
(fp16, optimizer stripped) is copied to ``--out`` with its paths made relative, and the
figures of ``preprocess.evaluate`` on the held-out test split go to a JSON file next to it,
with the command that made it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from common.config import REPO_ROOT, load_config
from common.io import atomic_path, write_json
from preprocess import evaluate
from preprocess.yolo import model_yaml, set_threads, ultralytics_offline


def _relative(value: Any) -> Any:
    """Paths under the repository (or absolute ones) reduced to something portable."""
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else path.name
    return value


def ship(best: Path, out: Path) -> Path:
    """Copy a stripped ultralytics checkpoint to ``out``, without local absolute paths."""
    import torch

    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    ckpt["train_args"] = {k: _relative(v) for k, v in ckpt.get("train_args", {}).items()}
    for key in ("optimizer", "ema", "updates", "train_metrics", "train_results"):
        ckpt.pop(key, None)
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return out


def train(data: Path, out: Path, work: Path, epochs: int = 12, imgsz: int = 192,
          batch: int = 16, width: float = 0.125, depth: float = 0.33, base: str = "yolov8.yaml",
          device: str = "cpu", threads: int = 1, seed: int = 0, amp: bool = False,
          patience: int = 10, warmup: float = 1.0, init: Path | None = None) -> Path:
    """Train on ``data`` (a ``preprocess.synth`` folder), from scratch or from the weights of an
    earlier run (``init``); return the shipped file."""
    data_yaml = data / "data.yaml" if data.is_dir() else data
    yolo = ultralytics_offline(work / "ultralytics")
    set_threads(threads)
    model = yolo.YOLO(str(model_yaml(work / "model.yaml", base, depth, width)), task="detect")
    model.train(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=device,
        workers=0, seed=seed, deterministic=True, amp=amp, plots=False,
        pretrained=str(init) if init else False, warmup_epochs=warmup,
        mosaic=0.0, close_mosaic=0, cache="ram", patience=patience, project=str(work),
        name="run", exist_ok=True, verbose=False,
    )
    return ship(Path(model.trainer.best), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="synthetic set folder")
    parser.add_argument("--out", type=Path, default=Path("preprocess/assets/overlay_yolo.pt"))
    parser.add_argument("--work", type=Path, default=Path("work/detector_train"),
                        help="training runs, checkpoints and ultralytics settings")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier")
    parser.add_argument("--depth", type=float, default=0.33, help="depth multiplier")
    parser.add_argument("--base", default="yolov8.yaml", help="ultralytics architecture yaml")
    parser.add_argument("--device", default="cpu", help="cpu, or a CUDA device such as 0")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--patience", type=int, default=10, help="early stop after N epochs")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs")
    parser.add_argument("--init", type=Path, help="start from these weights (an earlier run)")
    args = parser.parse_args(argv)
    start = time.time()
    weights = train(args.data, args.out, args.work, args.epochs, args.imgsz, args.batch,
                    args.width, args.depth, args.base, args.device, args.threads, args.seed,
                    args.amp, args.patience, args.warmup, args.init)
    conf = load_config(overrides=[f"preprocess.weights={weights}", f"preprocess.imgsz={args.imgsz}",
                                  f"run.n_jobs={args.threads}"])
    report = {
        "command": "python -m preprocess.train " + shlex.join(argv or sys.argv[1:]),
        "training_minutes": round((time.time() - start) / 60, 1),
        "test": evaluate.evaluate(conf, args.data, "test"),
        "thresholds": {k: conf["preprocess"][k] for k in
                       ("conf_global", "conf_local", "max_area", "max_aspect", "min_side")},
    }
    write_json(weights.with_suffix(".json"), report)
    print(weights, report["test"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
