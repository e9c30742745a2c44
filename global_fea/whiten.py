"""PCA whitening of global descriptors and the training-photo bank for score normalisation.

    copydet global-assets --images <fit part of the training photos> --work work

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
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common import UserError, cli
from common.io import atomic_path
from common.logs import start_run
from common.shards import ShardStore
from global_fea.codec import NONE, Codec, bank_path, codec_path
from global_fea.extract import extract_set, valid_rows


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
    store = ShardStore(root)
    parts = [np.asarray(store.load(k)["desc"])[rows] for k, rows, _ in valid_rows(store) if rows]
    if not parts:
        raise UserError(f"no image of {store.manifest['source']} could be described: the "
                        "whitening needs training photos")
    return np.concatenate(parts)


def main(conf: dict[str, Any], images: str | Path, work_dir: str | Path) -> Path:
    """Describe the training photos, train the whitening, write it and the bank."""
    section = conf["global_fea"]
    root = extract_set(conf, images, work_dir)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path,
                        help="training photos (the fit part; never the references)")


COMMAND = cli.Command("global-assets", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.images, a.work))

if __name__ == "__main__":
    cli.run_module("global_fea.whiten")
