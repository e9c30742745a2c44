"""Global descriptor extraction throughput on CPU: the stage against a bare forward pass.

    python -m bench.bench_global [--images DIR] [--n 192] [--repeats 3] [--threads 2]

Both run in this process, on the same images, with the same number of threads:

- bare: for each batch, PIL decode + RGB + resize to S x S, a tensor, normalisation, and
  the network's forward pass in the runtime the stage uses (``global_fea.runtime``: ONNX
  Runtime or torch), on as many threads as the stage calls it from, nothing else;
- stage: ``global_fea.extract.extract_set`` into a fresh work folder (robust decoding on the
  calling threads, shards written atomically, skip reports, logs); the network's one-time ONNX
  export into that folder is made before the clock starts.

``-o global_fea.runtime=torch`` measures the torch forward instead.

Runs alternate (bare, stage, bare, stage, ...) and each side keeps its best time, so load
from other processes hurts both alike; the ratio stage/bare is the stage's overhead.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.config import REPO_ROOT, load_config
from common.images import list_images
from global_fea import extract, runtime, weights
from global_fea.extract import Network


def network(section: dict, folder: Path, threads: int) -> list[Network]:
    """The descriptor network as the stage runs it on ``threads`` CPU cores, once per thread
    that calls it at once (``global_fea.runtime.cpu_callers``; an ONNX export goes to
    ``folder``)."""
    return runtime.cpu_callers(weights.build(section), section, folder, threads)


def bare_batch(paths: list[Path], net: Network, size: int, mirror: bool) -> int:
    """Decode, resize and describe one batch (and its mirror images); return the number of
    descriptors."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    with torch.inference_mode():
        x = net.preprocess(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
        return sum(len(net(view)) for view in ((x, x.flip(3)) if mirror else (x,)))


def bare_pass(paths: list[Path], nets: list[Network], size: int, batch: int,
              mirror: bool = False) -> int:
    """``bare_batch`` over ``paths`` in batches, the batches going round-robin to ``nets``,
    each entry on a thread of its own (as the stage calls them); return the number of
    descriptors."""
    batches = [paths[s:s + batch] for s in range(0, len(paths), batch)]
    with ThreadPoolExecutor(len(nets)) as pool:
        return sum(pool.map(lambda i: bare_batch(batches[i], nets[i % len(nets)], size, mirror),
                            range(len(batches))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "data" / "referenceimages")
    parser.add_argument("--n", type=int, default=192, help="images (cycled if the folder "
                        "has fewer)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override for the stage, e.g. global_fea.workers=0")
    args = parser.parse_args()
    conf = load_config(overrides=[f"run.n_jobs={args.threads}", "global_fea.device=cpu",
                                  *args.override])
    section = conf["global_fea"]
    sources = list(list_images(args.images).paths)
    tmp = Path(tempfile.mkdtemp(prefix="bench_global-"))
    try:
        folder = tmp / "images"
        folder.mkdir()
        paths = []
        for i in range(args.n):  # distinct files, so nothing is cached by name
            src = sources[i % len(sources)]
            paths.append(folder / f"{i:05d}{src.suffix}")
            shutil.copy(src, paths[-1])
        nets = network(section, tmp / "network", args.threads)
        size, batch = section["image_size"], extract.batch_size(section, torch.device("cpu"))
        bare_pass(paths[:batch], nets, size, batch)  # warm-up
        best = {"bare": np.inf, "stage": np.inf}
        for r in range(args.repeats):
            start = time.perf_counter()
            bare_pass(paths, nets, size, batch)
            best["bare"] = min(best["bare"], time.perf_counter() - start)
            work = tmp / f"work{r}"
            network(section, extract.model_root(conf, work), args.threads)  # export: untimed
            start = time.perf_counter()
            extract.extract_set(conf, folder, work)
            best["stage"] = min(best["stage"], time.perf_counter() - start)
        print(f"{args.n} images, {section['arch']} at {size} px, {args.threads} threads, "
              f"best of {args.repeats}")
        for name, seconds in best.items():
            print(f"{name:6s} {seconds:7.2f} s  {args.n / seconds:6.1f} images/s")
        print(f"stage / bare = {best['stage'] / best['bare']:.3f} "
              f"(overhead {100 * (best['stage'] / best['bare'] - 1):+.1f}%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
