"""Train the CPU search index (IVF quantiser, codecs) on RootSIFT of training photos.

    copydet train-index --images ../shared/trainset/photos --work work

ISC rules forbid fitting anything on the reference set, so the index is trained on a separate
photo collection and the trained, empty index is shipped in ``local_fea/assets``; the search
stage only adds the reference descriptors to a copy of it. A quantiser searched through HNSW
(the large-set index of ``auto``) has many lists: it is trained by two-level k-means
(``faiss.contrib.clustering``), a coarse k-means then one per coarse cluster, which costs
seconds where one k-means over all its lists costs a quarter of an hour per core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.clustering import two_level_clustering

from common import cli
from common.logs import start_run
from common.parallel import resolve_n_jobs
from common.shards import ShardStore
from local_fea import extract
from local_fea.index import AUTO, AUTO_INDEXES, DIM, trained_index_path, write_index


def sample_descriptors(store: ShardStore, n_max: int, seed: int = 0) -> np.ndarray:
    """Up to ``n_max`` descriptors of the store, drawn uniformly, as float32."""
    desc = np.concatenate([np.asarray(store.load(k)["views"]["orig"]["desc"]["data"])
                           for k in range(len(store.shards))])
    if len(desc) > n_max:
        desc = desc[np.sort(np.random.default_rng(seed).choice(len(desc), n_max, False))]
    return desc.astype(np.float32)


def train(factory: str, x: np.ndarray, seed: int = 1234) -> faiss.Index:
    """A trained, empty index of ``factory`` (two-level k-means for an HNSW quantiser)."""
    index = faiss.index_factory(DIM, factory)
    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        centroids, _ = two_level_clustering(x, int(np.sqrt(ivf.nlist)), ivf.nlist, seed=seed,
                                            min_points_per_centroid=1)  # no size warnings
        ivf.quantizer.add(centroids)  # the quantiser is complete: train() fits the codec
    index.train(x)
    return index


def main(conf: dict[str, Any], images: str | Path, work_dir: str | Path,
         max_train: int = 1_000_000) -> Path:
    """Extract features of the training photos, train ``local_search.index`` (with ``auto``:
    each index it chooses from), write it; return the (last) trained index file."""
    store_root = extract.main(conf, images, work_dir)
    sconf = conf["local_search"]
    factories = ([a.factory for a in AUTO_INDEXES] if sconf["index"] == AUTO
                 else [sconf["index"]])
    run = start_run(work_dir, "local_fea.train_index")
    with run:
        faiss.omp_set_num_threads(resolve_n_jobs(conf["run"]["n_jobs"]))
        x = sample_descriptors(ShardStore(store_root), max_train)
        for factory in factories:
            out = trained_index_path({**sconf, "index": factory},
                                     extract.features_root(conf, work_dir).name)
            run.logger.info("training %s on %d descriptors of %s", factory, len(x), images)
            start = time.time()
            index = train(factory, x)
            write_index(index, out)
            run.logger.info("trained in %.0f s -> %s (%.1f MB)", time.time() - start, out,
                            out.stat().st_size / 1e6)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path,
                        help="training photos (never the references)")
    parser.add_argument("--max-train", type=int, default=1_000_000,
                        help="descriptors sampled for training")


COMMAND = cli.Command("train-index", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.images, a.work, a.max_train))

if __name__ == "__main__":
    cli.run_module("local_fea.train_index")
