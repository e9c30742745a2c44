"""The run record: reads pipeline.json, store manifests, boxes.csv, skipped.csv; returns rows."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common import UserError
from common.shards import ShardStore

RECORD = "pipeline.json"
REQUIRED = ("queries", "references", "config", "stages", "branches", "submission")
MAX_SKIPPED_ROWS = 200
MIN_SECONDS = 0.1  # a stage quicker than this reused its outputs: no throughput shown
# configuration sections each stage's output depends on (others: the stage's package)
STAGE_SECTIONS = {
    "local_fea.extract": ("local_fea",),
    "local_fea.search": ("local_search",),
    "match_score.verify": ("match_score",),
    "preprocess.detect": ("preprocess",),
    "global_fea.extract": ("global_fea",),
    "global_fea.search": ("global_search",),
    "merge.fuse": ("merge",),
}
LOCAL_LIKE = ("query_store", "reference_store")  # branch entries a picture can be drawn from


def load_record(work: Path) -> dict[str, Any]:
    """The run record ``<work>/pipeline.json``; a ``UserError`` when missing or unreadable."""
    path = Path(work) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no run record {path}: run the pipeline into {work} first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the run record {path}: {e}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a run record (a JSON object expected)")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UserError(f"{path}: not a complete run record (missing {', '.join(missing)})")
    return record


def local_time(text: str | None) -> datetime | None:
    """An ISO time as naive local time (the run folders' stamps), or None."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t.astimezone().replace(tzinfo=None) if t.tzinfo else t


def count_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in f) - 1)


def _store_count(folder: Path) -> int | None:
    """Images of a feature store (removed ones left out), or None where there is none."""
    try:
        store = ShardStore(folder)
    except (UserError, OSError, ValueError):
        return None
    return len(store) - len(store.removed)


def count_output(path: Path) -> tuple[int | None, str]:
    """How many items a stage's output holds, and what they are."""
    try:
        if path.is_dir():
            return _store_count(path), "images"
        if path.suffix == ".csv":
            unit = {"boxes": "queries", "candidates": "candidates", "pairs": "pair rows"}
            return count_rows(path), unit.get(path.stem, "pairs")
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                return sum(len(f[k]) for k in ("query_ids", "reference_ids") if k in f), "images"
    except (OSError, ValueError):
        pass
    return None, ""


def _shown(path: str | Path, work: Path) -> str:
    """A path relative to the work folder when it is inside."""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(work))
    return str(path)


def stage_rows(record: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Time and throughput of each stage, in run order."""
    rows = []
    for stage in record["stages"]:
        output = Path(stage.get("output") or "")
        n, unit = count_output(output) if stage.get("output") else (None, "")
        seconds = float(stage.get("seconds") or 0.0)
        rows.append({"stage": stage.get("stage", "?"), "label": stage.get("label", ""),
                     "output": _shown(output, work) if stage.get("output") else "",
                     "seconds": seconds, "n_items": n, "unit": unit,
                     "rate": n / seconds if n is not None and seconds >= MIN_SECONDS else None})
    return rows


def settings(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configuration section the stages used, with the stages that used it."""
    conf = record["config"] if isinstance(record["config"], dict) else {}
    used: dict[str, list[str]] = {}
    for stage in record["stages"]:
        name = str(stage.get("stage", ""))
        sections = STAGE_SECTIONS.get(name, (name.split(".")[0],))
        for section in sections:
            if section in conf and name not in used.setdefault(section, []):
                used[section].append(name)
    if "run" in conf:
        used["run"] = ["every stage"]
    return [{"section": s, "stages": stages,
             "entries": [(k, json.dumps(v)) for k, v in conf[s].items()]
             if isinstance(conf[s], dict) else [("", json.dumps(conf[s]))]}
            for s, stages in used.items()]


def image_sets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The query and reference sets: folder and number of images (from the feature stores of
    the whole images, else from the global descriptors)."""
    counts: dict[str, int | None] = {"queries": None, "references": None}
    for entry in record["branches"].values():
        if counts["queries"] is None and entry.get("query_store") and not entry.get("boxes"):
            counts["queries"] = _store_count(Path(entry["query_store"]))
        if counts["references"] is None and entry.get("reference_store"):
            counts["references"] = _store_count(Path(entry["reference_store"]))
        if entry.get("h5") and None in counts.values():
            with contextlib.suppress(OSError, KeyError, ValueError):
                import h5py

                with h5py.File(entry["h5"], "r") as f:
                    for role, key in (("queries", "query_ids"), ("references", "reference_ids")):
                        counts[role] = len(f[key]) if counts[role] is None else counts[role]
    return [{"role": role, "folder": record[role], "images": counts[role]}
            for role in ("queries", "references")]


def crop_counts(record: dict[str, Any]) -> dict[str, int] | None:
    """Queries with a detected overlay box, per branch that uses its crop (boxes.csv)."""
    for entry in record["branches"].values():
        if entry.get("boxes"):
            try:
                with open(entry["boxes"], newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            except (OSError, csv.Error, UnicodeDecodeError):
                return None
            used = Counter(b for r in rows for b in (r.get("used_for") or "").split("+") if b)
            return {"queries": len(rows), "boxes": sum(bool(r.get("x1")) for r in rows),
                    **{f"crop_{b}": n for b, n in sorted(used.items())}}
    return None


@dataclass
class Skipped:
    """Inputs a stage left out, and why."""

    rows: list[dict[str, str]] = field(default_factory=list)
    reasons: list[tuple[str, int]] = field(default_factory=list)
    total: int = 0
    logs: list[tuple[str, str]] = field(default_factory=list)  # (name, link from the page)


def _run_folders(work: Path, record: dict[str, Any]) -> list[Path]:
    """The run-log folders of this run (their stamp within its start and finish)."""
    start, end = local_time(record.get("started")), local_time(record.get("finished"))
    folders = []
    for folder in sorted((work / "runs").glob("*")) if (work / "runs").is_dir() else []:
        try:
            stamp = datetime.strptime("-".join(folder.name.split("-")[:2]), "%Y%m%d-%H%M%S")
        except ValueError:
            continue
        slack = timedelta(seconds=2)
        if (start is None or stamp >= start - slack) and (end is None or stamp <= end + slack):
            folders.append(folder)
    return folders


def skipped_inputs(record: dict[str, Any], work: Path, out: Path) -> Skipped:
    """The stores' and this run's stages' ``skipped.csv`` rows, one per input and reason."""
    sources: list[tuple[str, Path]] = []
    for entry in record["branches"].values():
        for key in LOCAL_LIKE:
            if entry.get(key):
                sources.append((Path(entry[key]).name, Path(entry[key]) / "skipped.csv"))
    folders = _run_folders(work, record)
    sources += [(f.name.split("-", 2)[-1].rsplit("-", 1)[0], f / "skipped.csv") for f in folders]
    seen: set[tuple[str, str]] = set()
    result = Skipped()
    reasons: Counter[str] = Counter()
    for where, path in sources:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except OSError:
            continue
        for row in rows:
            image_id = row.get("id") or row.get("item") or ""
            key = (row.get("path", ""), row.get("reason", ""))
            if key in seen:
                continue
            seen.add(key)
            reasons[key[1]] += 1
            if len(result.rows) < MAX_SKIPPED_ROWS:
                result.rows.append({"where": where, "id": image_id, "path": key[0],
                                    "reason": key[1]})
    result.total = len(seen)
    result.reasons = reasons.most_common(10)
    result.logs = [(f.name, os.path.relpath(f / "run.log", out)) for f in folders
                   if (f / "run.log").exists()]
    return result



def ordered_branches(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The run's branches in the configured order (``merge.branches``), others after."""
    configured = record["config"].get("merge", {}).get("branches", []) if isinstance(
        record["config"], dict) else []
    rank = {name: i for i, name in enumerate(configured)}
    return sorted(record["branches"].items(), key=lambda kv: (rank.get(kv[0], len(rank)),
                                                              kv[0]))
