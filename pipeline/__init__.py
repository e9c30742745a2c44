"""The pipeline: every stage in order, each given the paths the previous one returned.

```
references ─► local_fea.extract ─► store ─┬──────────────────────────────────────────┐
queries ────► local_fea.extract ─► store ─┴► local_fea.search ─► candidates.csv ─────┤
queries ────► preprocess.detect ─► boxes.csv (inliers on a frame: no evidence) ──────┤
                                             match_score.verify ◄────────────────────┘
                                               └─► pairs.csv (local) ────────────────────┐
              preprocess.detect ─► boxes.csv + crops ─► the local stages on the crops   │
                                               └─► pairs.csv (crop_local) ───────────────┤
                                    crops ─► the global stages ─► pairs.csv (crop_global) ┤
queries, references ─► global_fea.extract ─► descriptors.h5 ─► global_fea.search         │
                                               └─► pairs.csv (global) ───────────────────┤
                                   merge.fuse ◄──────────────────────────────────────────┘
                                     └─► submission.csv (+ submission.features.csv)
```

A branch is declared once, in ``BRANCHES``: how it runs (its stages) and the fusion's view
of it (``merge.branches``: how its pairs are read and its evidence filled in). ``run`` runs the
branches of ``merge.branches`` and the fusion, and records in ``<work>/pipeline.json`` what
every stage returned and how long it took. Every stage skips what it has already done, so
running again resumes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import cli
from common.images import ImageSet, input_images
from common.io import write_json
from common.lock import work_lock
from common.resources import measured
from global_fea import extract as global_extract
from global_fea import search as global_search
from local_fea import extract, search
from local_fea.index import concrete_index
from match_score import verify
from merge import branches as fusion_branches
from merge import fuse
from merge.branches import BranchEvidence
from pipeline import checks
from preprocess import detect

RECORD = "pipeline.json"
Outputs = dict[str, Path]  # what a branch's stages returned; "pairs" is its pairs file


@dataclass
class Record:
    """What each stage of a run returned, and its wall time, CPU time and peak memory (this
    process and its workers). A stage called again with the same inputs (the reference
    features, for a second branch) returns what it returned."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    _done: dict[tuple, tuple[tuple, Path]] = field(default_factory=dict)

    def __call__(self, stage: str, label: str, main: Callable[..., Path], *args: Any) -> Path:
        key = (main, *map(id, args))  # the same objects (kept alive below, so ids stay theirs)
        if key not in self._done:
            with measured() as usage:
                output = main(*args)
            self._done[key] = (args, output)
            self.stages.append({"stage": stage, "label": label, "output": str(output),
                                "seconds": round(usage.seconds, 3),
                                "cpu_seconds": round(usage.cpu_seconds, 3),
                                "peak_rss_mb": round(usage.peak_rss_mb, 1)})
        return self._done[key][1]


def run_candidates(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
                   record: Record) -> Outputs:
    """The local branch up to its candidates: RootSIFT of both sets, search."""
    refs = record("local_fea.extract", references.name, extract.main, conf, references, work)
    qs = record("local_fea.extract", queries.name, extract.main, conf, queries, work, True)
    candidates = record("local_fea.search", queries.name, search.main, conf, qs, refs, work)
    return {"candidates": candidates, "query_store": qs, "reference_store": refs}


def run_verified(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
                 record: Record, boxes: Path | None = None) -> Outputs:
    """Candidates, verified and scored; ``boxes``: the detector's boxes of the queries
    (inliers on a frame around a box are no evidence, ``match_score.frames``)."""
    out = run_candidates(conf, queries, references, work, record)
    pairs = record("match_score.verify", queries.name, verify.main, conf, out["query_store"],
                   out["reference_store"], out["candidates"], work, boxes)
    return {"pairs": pairs, **out}


def frame_boxes(conf: dict[str, Any], images: ImageSet, work: Path,
                record: Record) -> Path | None:
    """The overlay detector's boxes of ``images`` where ``match_score.frames`` asks for them."""
    if not conf["match_score"]["frames"]:
        return None
    return record("preprocess.detect", images.name, detect.main, conf, images, work)


def run_local(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
              record: Record) -> Outputs:
    """The local branch: its candidates, verified (frames left out) and scored."""
    boxes = frame_boxes(conf, queries, work, record)
    return run_verified(conf, queries, references, work, record, boxes)


def run_crop_local(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
                   record: Record) -> Outputs:
    """The crop-local branch: the overlay detector's crops through the local branch."""
    boxes = record("preprocess.detect", queries.name, detect.main, conf, queries, work)
    crops = detect.crop_set(boxes, "local")
    return {**run_verified(conf, crops, references, work, record), "boxes": boxes}


def run_global(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
               record: Record) -> Outputs:
    """The global branch: descriptors of both sets in one h5, top-k search."""
    h5 = record("global_fea.extract", queries.name, global_extract.main, conf, queries,
                references, work)
    pairs = record("global_fea.search", queries.name, global_search.main, conf, h5, work)
    return {"pairs": pairs, "h5": h5}


def run_crop_global(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
                    record: Record) -> Outputs:
    """The crop-global branch: global descriptors of the overlay detector's crops."""
    boxes = record("preprocess.detect", queries.name, detect.main, conf, queries, work)
    crops = detect.crop_set(boxes, "global")
    return {**run_global(conf, crops, references, work, record), "boxes": boxes}


@dataclass(frozen=True)
class Branch:
    """A branch: how it runs (its stages), and the fusion's view of it (``merge.branches``)."""

    evidence: BranchEvidence
    run: Callable[[dict[str, Any], ImageSet, ImageSet, Path, Record], Outputs]
    sections: tuple[str, ...]  # the settings of its stages (devices checked before any work)

    @property
    def name(self) -> str:
        return self.evidence.name


LOCAL = ("local_fea", "local_search", "match_score")
GLOBAL = ("global_fea", "global_search")
DETECT = ("preprocess",)
RUNS = {"local": (run_local, DETECT + LOCAL),  # the detector: frames (match_score.frames)
        "global": (run_global, GLOBAL),
        "crop_local": (run_crop_local, DETECT + LOCAL),
        "crop_global": (run_crop_global, DETECT + GLOBAL)}
BRANCHES = {name: Branch(fusion_branches.BRANCHES[name], run, sections)
            for name, (run, sections) in RUNS.items()}


def selected(names: Sequence[str]) -> list[Branch]:
    """The branches of ``names`` (``merge.branches``), in that order."""
    return [BRANCHES[b.name] for b in fusion_branches.selected(names)]


def run_branches(conf: dict[str, Any], queries: ImageSet, references: ImageSet, work: Path,
                 record: Record | None = None) -> dict[str, Outputs]:
    """Run every branch of ``merge.branches``; return each one's outputs."""
    record = record or Record()
    return {branch.name: branch.run(conf, queries, references, work, record)
            for branch in selected(conf["merge"]["branches"])}


def run(conf: dict[str, Any], queries: str | Path, references: str | Path, work: str | Path,
        out: str | Path | None = None) -> Path:
    """Run the whole pipeline on two image folders, holding the work folder; return the
    submission CSV. When both are one folder, each image's copies are looked for among the
    other images: the pairs of an image with itself are left out of the submission."""
    with work_lock(work, "run", conf["run"]["lock_wait_s"]):
        return _run(conf, input_images(queries), input_images(references), Path(work), out)


def _run(conf: dict[str, Any], query_set: ImageSet, reference_set: ImageSet, work: Path,
         out: str | Path | None) -> Path:
    """``run`` on two listed image sets, the work folder held."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # settings that are wrong only together: stop before any work
    branches = selected(conf["merge"]["branches"])
    fusion = [b.evidence for b in branches]
    if conf["merge"]["method"] == "fusion":  # a model fitted for other branches
        fuse.fusion_model(conf, fusion)
    concrete_index(conf["local_search"], len(reference_set))  # nprobe auto, an unknown index
    checks.before_work(conf, branches, query_set, reference_set, work)  # devices, free space
    same_set = query_set.root.resolve() == reference_set.root.resolve()
    if same_set:  # an image's local candidates are the other images
        conf = {**conf, "local_search": {**conf["local_search"], "skip_same_id": True}}
    record = Record()
    outputs = run_branches(conf, query_set, reference_set, work, record)
    pair_files = {name: o["pairs"] for name, o in outputs.items()}
    submission = record("merge.fuse", "", fuse.main, conf, fusion, pair_files, work, out,
                        same_set)
    write_json(work / RECORD, {
        "queries": str(query_set.root.resolve()),
        "references": str(reference_set.root.resolve()),
        "config": conf, "stages": record.stages,
        "branches": {name: {k: str(v) for k, v in o.items()} for name, o in outputs.items()},
        "submission": str(submission), "features": str(fuse.features_path(submission)),
        "self_pairs_left_out": same_set, "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return submission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_set_args(parser)
    parser.add_argument("--out", type=Path, help="submission CSV (default: under --work)")


COMMAND = cli.Command("run", "Run every stage: two image folders in, the submission CSV out.",
                      add_arguments,
                      lambda conf, a: run(conf, a.queries, a.references, a.work, a.out))
