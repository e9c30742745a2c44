"""Train the overlay detector on the synthetic set and ship its weights.

    python -m preprocess.train --data work/overlay_synth \
        --out preprocess/assets/overlay_yolo.safetensors

The model is ultralytics' bundled YOLOv8 architecture at a small custom scale (``--width``,
``--depth``; one class), trained from scratch: no pretrained weights exist offline, and
ultralytics is kept from downloading anything (``preprocess.yolo``). Mosaic augmentation is
off, because a mosaic of four photos looks like pastes that nobody labelled; the rest are
ultralytics' defaults (flips, scale, translation, HSV jitter). The best epoch on the val split
goes to ``--out`` as fp16 safetensors with its architecture (``preprocess.yolo.save_weights``),
and the figures of ``preprocess.evaluate`` on the held-out test split go to a JSON file next
to it, with the command that made it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from common.config import load_config
from common.io import write_json
from preprocess import evaluate
from preprocess.yolo import load_model, model_yaml, save_weights, set_threads, ultralytics_offline


def train(data: Path, out: Path, work: Path, epochs: int = 12, imgsz: int = 192,
          batch: int = 16, width: float = 0.125, depth: float = 0.33, base: str = "yolov8.yaml",
          device: str = "cpu", threads: int = 1, seed: int = 0, amp: bool = False,
          patience: int = 10, warmup: float = 1.0, init: Path | None = None) -> Path:
    """Train on ``data`` (a ``preprocess.synth`` folder), from scratch or from the weights of an
    earlier run (``init``, a file of ``save_weights``); return the shipped file."""
    data_yaml = data / "data.yaml" if data.is_dir() else data
    ultralytics_offline(work / "ultralytics")
    set_threads(threads)
    if init:
        model = load_model(init)
        model.ckpt = {"init": str(init)}  # ultralytics then trains from the loaded weights
    else:
        model = ultralytics_offline().YOLO(str(model_yaml(work / "model.yaml", base, depth,
                                                          width)), task="detect")
    model.train(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=device,
        workers=0, seed=seed, deterministic=True, amp=amp, plots=False,
        pretrained=bool(init), warmup_epochs=warmup,
        mosaic=0.0, close_mosaic=0, cache="ram", patience=patience, project=str(work),
        name="run", exist_ok=True, verbose=False,
    )
    return save_weights(model.model, out)  # ultralytics reloaded the best epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="synthetic set folder")
    parser.add_argument("--out", type=Path,
                        default=Path("preprocess/assets/overlay_yolo.safetensors"))
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
