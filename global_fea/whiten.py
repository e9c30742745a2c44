"""PCA whitening of global descriptors and the training-photo bank for score normalisation.

    python -m global_fea.whiten --images ../shared/trainset/photos --work work

Trains the ``global_fea.whitening`` codec (a Faiss ``index_factory`` chain of vector
transforms, e.g. ``PCAW256,L2norm``: PCA to 256-d with whitening, then L2 normalisation) on
the descriptors of TRAINING photos (ISC rule: never fit anything on references), and
writes, next to it, the whitened descriptors of those photos in float16: the bank that
``global_fea.search`` normalises scores against (a query's similarity to its nearest
training photos is subtracted from its similarities to references). Both files are named
after the model and weights (``global_fea.weights.model_name``) and live in
``global_fea.assets``; the shipped ones were made from ``../shared/trainset`` (see README).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common import UserError, cli
from common.config import REPO_ROOT
from common.io import atomic_path
from common.logs import start_run
from common.shards import ShardStore
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
    path = Path(section["assets"])
    return path if path.is_absolute() else REPO_ROOT / path


def codec_path(section: dict[str, Any]) -> Path:
    return assets_dir(section) / f"{model_name(section)}-{slug(section['whitening'])}.faiss"


def bank_path(section: dict[str, Any]) -> Path:
    """The whitened training-photo descriptors (float16 .npy) for score normalisation."""
    return codec_path(section).with_suffix(".bank.npy")


def _hint(section: dict[str, Any]) -> str:
    return ("train it on training photos (never the references) with `python -m "
            "global_fea.whiten --images <training photos>` (make global-train-assets)")


def codec_digest(section: dict[str, Any]) -> str:
    """Hash of the trained codec's bytes (``none``: no codec)."""
    if section["whitening"] == NONE:
        return NONE
    path = codec_path(section)
    if not path.exists():
        raise UserError(f"no whitening {section['whitening']!r} for this model at {path}: "
                        + _hint(section))
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10]


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


def train_codec(x: np.ndarray, factory: str) -> faiss.Index:
    """Train ``factory`` (+ ``,Flat``) on descriptors ``x``; return the IndexPreTransform.

    A trained PCA applies only its ``d_out x d_in`` matrix: its ``d_in x d_in`` eigenvector
    matrix is dropped, which makes the shipped file several times smaller.
    """
    index = faiss.index_factory(x.shape[1], f"{factory},Flat")
    index.train(np.ascontiguousarray(x, np.float32))
    for transform in Codec(factory, index).transforms():
        if isinstance(transform, faiss.PCAMatrix):
            transform.PCAMat.clear()
    return index


def store_descriptors(root: Path) -> np.ndarray:
    """Raw descriptors of the described images of a store."""
    from global_fea.extract import valid_rows

    store = ShardStore(root)
    parts = [np.asarray(store.load(k)["desc"])[rows] for k, rows, _ in valid_rows(store) if rows]
    if not parts:
        raise UserError(f"no image of {store.manifest['source']} could be described: the "
                        "whitening needs training photos")
    return np.concatenate(parts)


def main(conf: dict[str, Any], images: str | Path, work_dir: str | Path) -> Path:
    """Describe the training photos, train the whitening, write it and the bank."""
    from global_fea.extract import extract_set

    section = conf["global_fea"]
    root = extract_set(conf, images, work_dir, set_name="whitening-training")
    run = start_run(work_dir, "global_fea.whiten")
    with run:
        x = store_descriptors(root)
        run.logger.info("%d training descriptors of %s (%d-d)", len(x), images, x.shape[1])
        out = codec_path(section)
        if section["whitening"] == NONE:
            codec = Codec(NONE)
        else:
            try:
                index = train_codec(x, section["whitening"])
            except RuntimeError as err:  # faiss: e.g. fewer photos than output dimensions
                raise UserError(f"cannot train {section['whitening']} on {len(x)} training "
                                f"descriptors: {str(err).splitlines()[0]}") from None
            with atomic_path(out) as tmp:
                faiss.write_index(index, str(tmp))
            codec = Codec(section["whitening"], index)
            run.logger.info("trained %s -> %s", section["whitening"], out)
        bank = codec.apply(x).astype(np.float16)
        with atomic_path(bank_path(section)) as tmp, open(tmp, "wb") as f:
            np.save(f, bank)
        run.logger.info("bank of %d whitened training descriptors -> %s", len(bank),
                        bank_path(section))
    return bank_path(section)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, type=Path,
                        help="training photos (never the references)")
    cli.add_common_args(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_main(main, cli.config_from_args(args), args.images, args.work)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from global_fea import whiten

    whiten.run_cli()
