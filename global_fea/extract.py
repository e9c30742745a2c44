"""Stage: global descriptors of a query and a reference folder, as an ISC descriptor h5.

    copydet global-extract --queries data/queryimages --references data/referenceimages

Each image folder gets a resumable store of raw descriptors (``common.shards.ShardStore``:
one joblib shard per ``run.shard_size`` images, written atomically; a restarted run
computes only what is missing) under ``<work>/global_fea/<model>/<set key>/``. Queries are also
described mirrored (``global_fea.mirror_queries``). The descriptors are then whitened
(``global_fea.whitening``, trained on training photos) and written, streamed shard by shard,
to one HDF5 file in the ISC2021 descriptor-track layout:

- ``query`` (n_q, d) float32 and ``query_ids`` (n_q,) strings, sorted by id;
- ``reference`` (n_r, d) float32 and ``reference_ids``, sorted by id;
- ``query_mirror`` (n_q, d), the mirrored queries' descriptors, when described.

When the queries are the references (one folder), ``reference`` and ``reference_ids`` are
links to ``query`` and ``query_ids``: each image is held once.

Unreadable images are skipped (logged and listed in the store's ``skipped.csv``) and are not
in the h5. The file is written to a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import contextlib
import copy
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common import cli
from common.config import digest, output_name
from common.devices import torch_devices
from common.h5write import atomic_h5
from common.images import ImageError, ImageSet, input_images, read_image
from common.io import dump_joblib
from common.logs import RunLog, start_run
from common.parallel import resolve_n_jobs, thread_pool
from common.shards import ShardStore
from global_fea import codec as whitening
from global_fea import runtime, weights
from global_fea.model import GlobalDescriptor

STAGE = "global_fea"
H5 = "descriptors.h5"
# Workers are spawned, not forked: a fork of a process whose OpenMP threads have run (Faiss,
# OpenCV, torch) can deadlock in the child.
SPAWN = "spawn"
CPU_BATCH, GPU_BATCH = 8, 32  # global_fea.batch_size: auto


def model_root(conf: dict[str, Any], work_dir: str | Path) -> Path:
    """Folder of every image set's raw descriptors made with this model."""
    return Path(work_dir) / STAGE / weights.model_name(conf[STAGE])


def devices_of(section: dict[str, Any]) -> list[torch.device]:
    """``global_fea.device``: ``auto`` is every GPU torch sees, else the CPU; or as named
    (``common.devices.torch_devices``)."""
    return [torch.device(d) for d in torch_devices(section["device"], "global_fea.device")]


def device_of(section: dict[str, Any]) -> torch.device:
    """The first device of ``devices_of`` (for single-device callers)."""
    return devices_of(section)[0]


def loader_workers(section: dict[str, Any], device: torch.device | Sequence[torch.device],
                   n_jobs: int | None) -> int:
    """DataLoader workers: ``global_fea.workers``, or (auto) all cores (up to 8 per GPU) next
    to GPUs and none on CPU: there the forward pass uses every core, so a decoding worker (a
    process, or a thread) only adds contention (devset references, 2 cores, ONNX Runtime:
    24.9 s without, 27.4 s with a worker process, 26.1 s with a decoding thread)."""
    devices = [device] if isinstance(device, torch.device) else list(device)
    if section["workers"] != "auto":
        return int(section["workers"])
    return min(8 * len(devices), resolve_n_jobs(n_jobs)) if devices[0].type == "cuda" else 0


def batch_size(section: dict[str, Any], device: torch.device) -> int:
    """Images per forward pass on ``device``: ``global_fea.batch_size``, or (auto) 32 on a GPU
    and 8 on CPU, where a small batch keeps more of a layer's activations in cache: 3-10 % more
    images per second than batches of 32 on 2 cores (ONNX Runtime; the same descriptors, bit
    for bit), and a quarter of the activations per calling thread."""
    if section["batch_size"] != "auto":
        return int(section["batch_size"])
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def load_square(path: str, size: int, max_pixels: int) -> np.ndarray:
    """An RGB image resized to ``size`` x ``size`` (JPEGs decoded at a reduced scale)."""
    rgb, _ = read_image(path, "RGB", min_side=size, max_pixels=max_pixels)
    h, w = rgb.shape[:2]
    shrink = h >= size and w >= size
    return cv2.resize(rgb, (size, size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class ImageFolderData(Dataset):
    """(uint8 tensor (3, S, S), reason) per path; an unusable image gives zeros and its reason."""

    def __init__(self, paths: Sequence[str], size: int, max_pixels: int):
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        cv2.setNumThreads(1)
        try:
            img, reason = load_square(self.paths[i], self.size, self.max_pixels), ""
        except ImageError as err:
            img, reason = np.zeros((self.size, self.size, 3), np.uint8), str(err)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), reason


Network = GlobalDescriptor | runtime.OnnxDescriptor


def describe_batch(model: Network, images: torch.Tensor, mirror: bool,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """(descriptors, mirrored descriptors or None) of one uint8 batch, on ``model``'s device
    (``device``: made current, with float16 autocast, on CUDA)."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    current = torch.cuda.device(device) if cuda else contextlib.nullcontext()
    with current, torch.inference_mode(), autocast:
        x = model.preprocess(images)
        desc = model(x).float().cpu().numpy()
        flipped = model(x.flip(3)).float().cpu().numpy() if mirror else None
    return desc, flipped


def describe_batches(
    model: Network | Sequence[Network], paths: Sequence[str],
    section: dict[str, Any], mirror: bool, device: torch.device | Sequence[torch.device],
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """(descriptors, mirrored descriptors or None, reasons) per batch of ``paths``, in order.

    With several devices (``model``: one replica per device, in the same order; or the CPU
    sessions of ``runtime.cpu_callers``, one per calling thread) the batches go
    round-robin to them, each run by its own thread, a few batches ahead, and decoded there
    unless loader ``workers`` decode them; results still come in the order of ``paths``.
    """
    models = [model] if isinstance(model, Network) else list(model)
    devices = [device] if isinstance(device, torch.device) else list(device)
    if len(models) != len(devices):
        raise ValueError(f"{len(models)} model(s) for {len(devices)} device(s)")
    data = ImageFolderData(paths, section["image_size"], section["max_pixels"])
    size = batch_size(section, devices[0])
    jobs: Iterable[tuple[torch.Tensor, Sequence[str]] | range]
    if workers or len(devices) == 1:  # decoded by the loader (in its workers, if any)
        jobs = DataLoader(data, batch_size=size, num_workers=workers,
                          pin_memory=devices[0].type == "cuda",
                          prefetch_factor=4 if workers else None,
                          multiprocessing_context=SPAWN if workers else None)
    else:  # rows of ``data``, decoded by the thread that describes them
        jobs = (range(s, min(s + size, len(data))) for s in range(0, len(data), size))
    if len(devices) == 1:
        for job in jobs:
            yield describe_job(models[0], data, job, mirror, devices[0])
        return
    with contextlib.ExitStack() as stack:
        pools = [stack.enter_context(thread_pool(1, f"describe-{d}")) for d in devices]
        pending: deque[Future] = deque()
        for i, job in enumerate(jobs):
            d = i % len(devices)
            pending.append(pools[d].submit(describe_job, models[d], data, job, mirror,
                                           devices[d]))
            while len(pending) > 2 * len(devices):  # keep every device two batches ahead
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def describe_job(model: Network, data: ImageFolderData,
                 job: tuple[torch.Tensor, Sequence[str]] | range, mirror: bool,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """``describe_batch`` of a batch the loader decoded, ``(images, reasons)``, or of the rows
    ``job`` of ``data``, decoded here."""
    if isinstance(job, range):
        items = [data[i] for i in job]
        job = torch.stack([image for image, _ in items]), [reason for _, reason in items]
    images, reasons = job
    return (*describe_batch(model, images, mirror, device), list(reasons))


def shard_needs(store: ShardStore, k: int, mirror: bool) -> bool:
    """Shard ``k`` is missing, or lacks the mirrored descriptors now asked for."""
    return not store.shard_path(k).exists() or (mirror and "mirror" not in store.load(k))


def extract_set(conf: dict[str, Any], images: str | Path | ImageSet, work_dir: str | Path,
                mirror: bool = False) -> Path:
    """Describe every image of ``images`` into its raw descriptor store; return the store."""
    section = conf[STAGE]
    image_set = input_images(images)
    root = model_root(conf, work_dir) / image_set.key
    run = start_run(work_dir, f"{STAGE}.extract-{image_set.name}")
    with run:
        store = ShardStore.plan(root, image_set, conf["run"]["shard_size"])
        todo = [k for k in range(len(store.shards)) if shard_needs(store, k, mirror)]
        run.logger.info("%s: %d images in %d shards, %d to describe -> %s", image_set.name,
                        len(store), len(store.shards), len(todo), root)
        if todo:
            describe_shards(store, todo, section, conf["run"]["n_jobs"], mirror, run)
        skipped = store.write_skipped()
        run.logger.info("%s: %d of %d images skipped in all (%s)", image_set.name, skipped,
                        len(store), root / "skipped.csv")
    return root


def describe_shards(store: ShardStore, todo: list[int], section: dict[str, Any],
                    n_jobs: int | None, mirror: bool, run: RunLog) -> None:
    """Describe the images of shards ``todo`` on every device of ``global_fea.device`` (one
    model replica each); write each shard as soon as it is complete."""
    devices = devices_of(section)
    model = weights.build(section)
    if devices[0].type == "cpu":
        models = runtime.cpu_callers(model, section, store.root.parent, resolve_n_jobs(n_jobs))
        devices = devices * len(models)
    else:
        runtime.use_onnx(section, devices[0])  # runtime=onnx on a GPU: one line, not a crash
        copies = [copy.deepcopy(model).to(d) for d in devices[1:]]
        models = [model.to(devices[0]), *copies]
    onnx = isinstance(models[0], runtime.OnnxDescriptor)
    run.logger.info("global descriptors on %s, in %s", ", ".join(map(str, devices)),
                    f"ONNX Runtime ({len(models)} threads, each calling its own session)"
                    if onnx else "torch")
    tasks = store.tasks(todo)
    paths = [p for t in tasks for p in t.paths]
    batches = describe_batches(models, paths, section, mirror, devices,
                               loader_workers(section, devices, n_jobs))
    pending: dict[str, list] = {"desc": [], "mirror": [], "status": []}
    task_iter = iter(tasks)
    task = next(task_iter)
    with tqdm(total=len(paths), desc=f"global {store.root.name}", unit="img",
              dynamic_ncols=True, mininterval=0.5) as bar:
        for desc, flipped, reasons in batches:
            pending["desc"] += list(desc)
            pending["mirror"] += list(flipped) if flipped is not None else []
            pending["status"] += reasons
            bar.update(len(reasons))
            while task is not None and len(pending["status"]) >= len(task.ids):
                n = len(task.ids)
                payload = {"ids": list(task.ids), "status": pending["status"][:n],
                           "desc": np.stack(pending["desc"][:n]).astype(np.float32)}
                if mirror:
                    payload["mirror"] = np.stack(pending["mirror"][:n]).astype(np.float32)
                dump_joblib(payload, task.out)
                for image_id, path, reason in zip(task.ids, task.paths, payload["status"],
                                                  strict=True):
                    if reason:
                        run.skip(image_id, path, reason)
                pending = {key: rows[n:] for key, rows in pending.items()}
                task = next(task_iter, None)


def valid_rows(store: ShardStore) -> Iterator[tuple[int, list[int], list[str]]]:
    """(shard, rows, ids) of the described (not skipped, not removed) images of each shard."""
    for k in range(len(store.shards)):
        shard = store.load(k)
        rows = [r for r, (i, s) in enumerate(zip(shard["ids"], shard["status"], strict=True))
                if not s and not store.is_removed(i)]
        yield k, rows, [shard["ids"][r] for r in rows]


def write_h5(out: Path, stores: dict[str, ShardStore], codec: whitening.Codec, mirror: bool,
             attrs: dict[str, str]) -> Path:
    """Whiten the stores' descriptors and write the ISC h5 (module docstring), atomically."""
    with atomic_h5(out) as (f, guard):
        f.attrs.update(attrs)
        for role, store in stores.items():
            if role == "reference" and store.root == stores["query"].root:
                for name in ("reference", "reference_ids"):  # one folder: each image once
                    f[name] = h5py.SoftLink(f"/{name.replace('reference', 'query')}")
                continue
            valid = list(valid_rows(store))
            ids = sorted(i for _, _, shard_ids in valid for i in shard_ids)
            position = {image_id: i for i, image_id in enumerate(ids)}
            keys = ["desc", "mirror"] if role == "query" and mirror else ["desc"]
            sets = {}
            for key in keys:
                name = role if key == "desc" else f"{role}_mirror"
                dim = codec.out_dim(np.asarray(store.load(0)[key]).shape[1]) if ids else 0
                chunks = (min(len(ids), 4096), dim) if ids else None  # none: nothing was read
                sets[key] = f.create_dataset(name, (len(ids), dim), np.float32, chunks=chunks)
            f.create_dataset(f"{role}_ids", data=np.array(ids, dtype=object),
                             dtype=h5py.string_dtype())
            for k, rows, shard_ids in tqdm(valid, desc=f"h5 {role}", unit="shard",
                                           dynamic_ncols=True, mininterval=0.5):
                if guard.error is not None:  # raised once HDF5 has closed the file
                    return out
                if not rows:
                    continue
                where = np.array([position[i] for i in shard_ids])
                order = np.argsort(where)
                shard = store.load(k)
                for key, dataset in sets.items():
                    x = codec.apply(np.asarray(shard[key])[rows][order])
                    dataset[where[order]] = x
    return out


def h5_path(conf: dict[str, Any], queries: Path, references: Path, work_dir: str | Path) -> Path:
    """Where the descriptors of two image sets go (folders or stores: named after them)."""
    section = conf[STAGE]
    keys = {"name": "{whitening}", "whitening": section["whitening"],
            "mirror_queries": section["mirror_queries"]}
    codec_name = output_name(keys, whitening.codec_digest(section))
    return (model_root(conf, work_dir) / codec_name
            / f"{Path(queries).resolve().name}-vs-{Path(references).resolve().name}" / H5)


def main(conf: dict[str, Any], queries: str | Path | ImageSet,
         references: str | Path | ImageSet, work_dir: str | Path) -> Path:
    """Describe the queries (and their mirror images) and the references; write the h5 and
    return its path."""
    section = conf[STAGE]
    codec = whitening.load_codec(section)  # fails early when the whitening is not trained
    mirror = bool(section["mirror_queries"])
    q_root = extract_set(conf, queries, work_dir, mirror=mirror)
    r_root = extract_set(conf, references, work_dir)
    stores = {"query": ShardStore(q_root), "reference": ShardStore(r_root)}
    out = h5_path(conf, q_root, r_root, work_dir)
    stamp = digest([s.revision for s in stores.values()], mirror, codec.label)
    if out.exists():
        with h5py.File(out, "r") as f:
            if f.attrs.get("stores") == stamp:
                return out
    return write_h5(out, stores, codec, mirror, {"stores": stamp, "whitening": codec.label})


COMMAND = cli.Command("global-extract", __doc__, cli.add_set_args,
                      lambda conf, a: main(conf, a.queries, a.references, a.work))

if __name__ == "__main__":
    cli.run_module("global_fea.extract")
