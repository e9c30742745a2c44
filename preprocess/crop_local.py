"""Stage: the crop-local branch, i.e. the local branch run again on the overlay detector's crops.

    python -m preprocess.crop_local --queries data/queryimages --references data/referenceimages

Takes the queries whose box passed ``preprocess.conf_local`` in ``preprocess.detect``, extracts
the local features of their crops (with the mirror view), searches them in the references'
feature store and verifies the candidates exactly as the local branch does for whole queries:
the same modules and settings, so the scores are the same calibrated probabilities. Queries
without a box are left out, since their "crop" is the whole image, which the local branch has
already matched. The crops keep the query ids, so ``pairs.csv`` has the original query ids and
``merge`` fuses it with the other branches as evidence of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import cli
from common.images import ImageSet, list_images
from common.io import read_csv
from local_fea import extract, search
from local_fea.extract import features_root, store_for
from match_score import verify
from preprocess.detect import crop_folder, crops, detections

BRANCH = "local"


def store_name(root: Path) -> str:
    """Feature store name of the crops: query set, branch and detection settings."""
    return f"{crop_folder(root, BRANCH).name}-{root.parent.name.rsplit('-', 1)[-1]}"


def crop_set(conf: dict[str, Any], queries: str | Path, work_dir: str | Path) -> ImageSet:
    """The crops that the local branch uses (queries whose box passed ``conf_local``)."""
    folder = list_images(crops(conf, queries, work_dir, BRANCH))
    root = folder.root.parent
    cropped = {r["query_id"] for r in read_csv(root / "boxes.csv")
               if BRANCH in r["used_for"].split("+")}
    keep = [(i, p) for i, p in zip(folder.ids, folder.paths, strict=True) if i in cropped]
    return ImageSet(store_name(root), folder.root, tuple(i for i, _ in keep),
                    tuple(p for _, p in keep))


def query_store(conf: dict[str, Any], queries: str | Path, work_dir: str | Path) -> Path:
    """The local feature store of the crops of ``queries`` (whether or not it exists)."""
    return features_root(conf, work_dir) / store_name(detections(conf, queries, work_dir))


def pairs_path(conf: dict[str, Any], queries: str | Path, references: str | Path,
               work_dir: str | Path) -> Path:
    """Where this branch's ``pairs.csv`` goes (whether or not it has run)."""
    q_store = query_store(conf, queries, work_dir)
    r_store = store_for(conf, references, work_dir)
    candidates = search.candidates_path(conf, q_store, r_store, work_dir)
    return verify.pairs_path(conf, candidates, work_dir)


def main(conf: dict[str, Any], queries: str | Path, references: str | Path,
         work_dir: str | Path) -> Path:
    """Run the local branch on the crops of ``queries``; return the scored ``pairs.csv``."""
    crops = crop_set(conf, queries, work_dir)
    r_store = store_for(conf, references, work_dir)
    q_store = extract.main(conf, crops, work_dir, mirror=True)
    search.main(conf, q_store, r_store, work_dir)
    return verify.main(conf, q_store, r_store, work_dir)


def run_cli(argv: list[str] | None = None) -> None:
    cli.run_set_stage(main, __doc__, argv)


if __name__ == "__main__":  # go through the package module so that workers can unpickle tasks
    from preprocess import crop_local

    crop_local.run_cli()
