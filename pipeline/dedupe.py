"""``copydet dedupe``: the pipeline on one folder, each image described once, each unordered
pair verified and scored once; then groups, the image to keep, the lists.

```
images ─► local_fea.extract (query settings, mirror view derived) ─► one store S
  S against S ─► local_fea.search (no image its own candidate) ─► candidates
             ─► dedupe.pairs (each image's best dedupe.candidates; unordered, once)
             ─► match_score.verify (inliers on a frame the detector found: no evidence)
             ─► pairs (local)
images ─► global_fea.extract (no mirror: dedupe.global_mirror) ─► one h5 (references link to
  the queries) ─► global_fea.search ─► unordered
images ─► preprocess.detect ─► crops ─► their own store ─► searched in S ─► verified ─► unordered
  merge.fuse (unordered: gaps and fill ranks over both images) ─► pairs.csv
  dedupe.groups (threshold, grouping, keep rule) ─► groups.csv, duplicates.json, keep/remove
  evaluation.report.groups ─► report/index.html (the groups as contact sheets)
```

Ids are file names (paths relative to the folder where it has sub-folders), so ``a.jpg`` and
``a.png`` are two images. Every stage resumes as in ``run``; ``<out>/dedupe.json`` records
what each stage returned and its time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import UserError, cli
from common.images import ImageSet, input_images
from common.io import write_csv, write_json
from common.lock import work_lock
from common.shards import ShardStore
from dedupe import groups as grouping
from dedupe.pairs import (
    frame_gate,
    identical_files,
    two_hop,
    unordered_candidates,
    unordered_file,
)
from evaluation.report.groups import write_page
from global_fea import extract as global_extract
from global_fea import search as global_search
from local_fea import extract, search
from local_fea.index import concrete_index
from match_score import verify
from merge import fuse
from merge.evidence import LOGIT_FLOOR
from pipeline import Outputs, Record, checks, frame_boxes, selected
from preprocess import detect

RECORD = "dedupe.json"
IDS = "name"  # ids are file names or relative paths (common.images.image_id)
Runner = Callable[[dict[str, Any], ImageSet, Path, Record, Path], Outputs]


def local_pairs(conf: dict[str, Any], images: ImageSet, work: Path, record: Record,
                store: Path) -> Outputs:
    """The local branch: S searched in S, each unordered pair verified once (the inliers on
    a frame of either image are no evidence: ``match_score.frames``)."""
    found = record("local_fea.search", images.name, search.main, conf, store, store, work)
    candidates = record("dedupe.pairs", "local candidates", unordered_candidates, found,
                        conf["dedupe"]["candidates"])
    boxes = frame_boxes(conf, images, work, record)
    pairs = record("match_score.verify", images.name, verify.main, conf, store, store,
                   candidates, work, boxes, boxes)
    return {"pairs": pairs, "candidates": candidates}


def crop_local_pairs(conf: dict[str, Any], images: ImageSet, work: Path, record: Record,
                     store: Path) -> Outputs:
    """The crop-local branch: the detector's crops searched in S and verified."""
    boxes = record("preprocess.detect", images.name, detect.main, conf, images, work)
    crops = detect.crop_set(boxes, "local")
    crop_store = record("local_fea.extract", crops.name, extract.main, conf, crops, work, True)
    candidates = record("local_fea.search", crops.name, search.main, conf, crop_store, store,
                        work)  # a crop's own image is no candidate (local_search.skip_same_id)
    pairs = record("match_score.verify", crops.name, verify.main, conf, crop_store, store,
                   candidates, work, None, frame_boxes(conf, images, work, record))
    return {"pairs": record("dedupe.pairs", "crop_local", unordered_file, pairs, "score"),
            "boxes": boxes}


def global_pairs(conf: dict[str, Any], images: ImageSet, work: Path, record: Record,
                 _store: Path, crops: str = "") -> Outputs:
    """The global branch (of the crops' descriptors, ``crops``: their branch) in one h5."""
    queries = images
    if crops:
        boxes = record("preprocess.detect", images.name, detect.main, conf, images, work)
        queries = detect.crop_set(boxes, crops)
    h5 = record("global_fea.extract", queries.name, global_extract.main, conf, queries,
                images, work)
    pairs = record("global_fea.search", queries.name, global_search.main, conf, h5, work)
    return {"pairs": record("dedupe.pairs", f"global {crops}", unordered_file, pairs, "score"),
            "h5": h5}


RUNS: dict[str, Runner] = {
    "local": local_pairs, "crop_local": crop_local_pairs, "global": global_pairs,
    "crop_global": lambda c, i, w, r, s: global_pairs(c, i, w, r, s, "global"),
}


def image_info(store: Path, images: ImageSet) -> dict[str, grouping.ImageInfo]:
    """Pixels (from the store) and file size of every described image (the keep rule)."""
    shards = ShardStore(store)
    info = {}
    paths = dict(zip(images.ids, images.paths, strict=True))
    for k in range(len(shards.shards)):
        shard = shards.load(k, cache=False)
        for image, status, (w, h) in zip(shard["ids"], shard["status"], shard["size"],
                                         strict=True):
            if not status and image in paths:
                info[image] = grouping.ImageInfo(int(w) * int(h), paths[image].stat().st_size)
    return info


def fusion_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with the fusion model of one folder's unordered pairs (``dedupe.fusion_model``,
    fitted by ``copydet calibrate-dedupe``): a pair's gap to the best pair of its images
    means something else there than to the best reference of a query."""
    return {**conf, "merge": {**conf["merge"], "fusion_model": conf["dedupe"]["fusion_model"]}}


def fused_pairs(conf: dict[str, Any], pair_files: dict[str, Path], images: ImageSet,
                work: Path, out: Path, boxes: Path | None = None) -> Path:
    """``pairs.csv``: every unordered pair once, its calibrated fusion score and the branches
    that found it; byte-identical files score 1 (``identical``), and a pair scoring more
    through an image both are copies of takes that score (``two_hop``). Beside it,
    ``pairs.features.csv``: the fusion's features of every pair it scored."""
    branches = [b.evidence for b in selected(conf["merge"]["branches"])]
    conf = fusion_conf(conf)
    folder = fuse.run_folder(conf, pair_files, work, True)
    table, scores = fuse.fused_scores(conf, branches, pair_files, folder, True, unordered=True)
    if boxes is not None:
        scores = frame_gate(table, scores, set(detect.crop_set(boxes, "local").ids),
                            floor=LOGIT_FLOOR)
    write_csv(fuse.features_path(out / grouping.PAIRS),
              ["image_a", "image_b", "found_by", *table.features, "score"],
              [(a, b, by, *(f"{v:.6g}" for v in x), f"{s:.9g}") for (a, b), by, x, s
               in zip(table.pairs, table.found_by, table.x, scores, strict=True)])
    rows = {p: (float(s), by) for p, by, s in zip(table.pairs, table.found_by, scores.tolist(),
                                                   strict=True)}
    for pair in identical_files(images.ids, images.paths):
        by = rows.get(pair, (0.0, ""))[1]
        rows[pair] = (1.0, "+".join(filter(None, [by, "identical"])))
    for pair, score in two_hop({p: s for p, (s, _) in rows.items()}).items():
        by = rows.get(pair, (0.0, ""))[1]
        rows[pair] = (score, "+".join(filter(None, [by, "two_hop"])))
    ranked = sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return write_csv(out / grouping.PAIRS, grouping.PAIR_COLUMNS,
                     [(a, b, f"{s:.9g}", by) for (a, b), (s, by) in ranked])


def dedupe(conf: dict[str, Any], images: str | Path, work: str | Path,
           out: str | Path | None = None) -> Path:
    """Deduplicate the folder ``images`` (module docstring), holding the work folder; return
    the output folder (default ``<work>/dedupe/<folder>-<hash>``)."""
    with work_lock(work, "dedupe", conf["run"]["lock_wait_s"]):
        image_set = input_images(images, IDS)
        work = Path(work)
        return _dedupe(conf, image_set, work, Path(out) if out else
                       work / "dedupe" / image_set.key)


def _dedupe(conf: dict[str, Any], images: ImageSet, work: Path, out: Path) -> Path:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    conf = {**conf, "global_fea": {**conf["global_fea"],
                                   "mirror_queries": conf["dedupe"]["global_mirror"]},
            "local_search": {**conf["local_search"], "skip_same_id": True}}
    branches = selected(conf["merge"]["branches"])
    if conf["merge"]["method"] != "fusion":
        raise UserError(f"copydet dedupe scores pairs with its fusion only, not "
                        f"merge.method={conf['merge']['method']!r}: leave merge.method at fusion")
    fuse.fusion_model(fusion_conf(conf), [b.evidence for b in branches])  # fitted for these?
    concrete_index(conf["local_search"], len(images))
    checks.before_work(conf, branches, images, images, work)
    record = Record()
    store = record("local_fea.extract", images.name, extract.main, conf, images, work, True)
    outputs = {b.name: RUNS[b.name](conf, images, work, record, store) for b in branches}
    pair_files = {name: o["pairs"] for name, o in outputs.items()}
    boxes = outputs.get("crop_local", {}).get("boxes")
    pairs = record("merge.fuse", "unordered", fused_pairs, conf, pair_files, images, work, out,
                   boxes)
    section = conf["dedupe"]
    scored = grouping.read_pairs(pairs)
    groups = grouping.make_groups(scored, section["threshold"], image_info(store, images),
                                  section["grouping"])
    grouping.write_outputs(out, images.ids, groups)
    record_json = {
        "images": str(images.root.resolve()), "n_images": len(images), "store": str(store),
        "config": conf, "stages": record.stages, "threshold": section["threshold"],
        "grouping": section["grouping"], "n_groups": len(groups),
        "n_removed": sum(len(g) - 1 for g in groups),
        "branches": {name: {k: str(v) for k, v in o.items()} for name, o in outputs.items()},
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_page(out, record_json, groups, scored, dict(zip(images.ids, images.paths,
                                                          strict=True)))
    write_json(out / RECORD, record_json)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="the folder to deduplicate "
                        "(never changed: the outputs are lists)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: <work>/dedupe/<folder>-<hash>)")


COMMAND = cli.Command("dedupe", "Deduplicate one folder: pairs of copies, groups, what to keep.",
                      add_arguments, lambda conf, a: dedupe(conf, a.images, a.work, a.out))
