"""Time of ``copydet dedupe`` on one folder against ``copydet run`` on the same images split
1:4 into queries and references (issue 29's scale target: dedupe within 1.3x of the run).

    make dedupe-scale N=20000    # python -m bench.bench_dedupe_scale --n 20000

The folder (``<work>/images-<hash>``): every readable photo of ``--photos`` (the training photos),
then edited copies of them in turn (``data.edits.random_chain``: one or two random edits,
seeded per image, textures for backgrounds) until there are ``--n`` images; made once,
resumed where it stopped. The run takes every fifth image (by name) as a query and the
others as references. Both run from a cold start (their work folders emptied), one after
the other, on this machine; the table gives wall seconds, CPU seconds and peak memory of
each, the ratio, and each stage's seconds from the records they write (``pipeline.json``,
``dedupe.json``); then the dedupe's groups and pairs against the folder's own truth (a photo
and its copies are a group; look-alikes among the photos, bursts for one, count as false
pairs). Results go to ``<work>/results.json`` and, as Markdown, to standard output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.memory import measure
from common import cli
from common.config import REPO_ROOT, digest
from common.io import clean_stale_tmp, write_csv, write_json
from common.parallel import parallel_map, spread
from data.edits import random_chain
from data.photos import load_photo, readable_photos, save_jpeg
from evaluation.dedupe import evaluate, read_output

PHOTOS = (REPO_ROOT.parent / "shared" / "trainset" / "photos",
          REPO_ROOT.parent / "shared" / "trainset" / "more_photos")
COPYDET = [sys.executable, "-m", "copydet"]  # this checkout's, wherever the venv points
QUERY_EVERY = 5


def edit_copies(task: tuple[list[tuple[int, str]], str, int]) -> int:
    """Write the edited copies ``(number, source photo)`` of one task; return their number.
    Backgrounds and occluders are textures: a photo pasted onto another of the folder would
    be a copy of both."""
    todo, folder, seed = task
    for number, source in todo:
        rng = np.random.default_rng([seed, number])
        edited = random_chain(load_photo(Path(source), 1024), rng, (), (1, 2))
        save_jpeg(edited.image, Path(folder) / f"E{number:06d}.jpg", 90)
    return len(todo)


def make_folder(photos: list[Path], n: int, root: Path, seed: int = 0) -> Path:
    """A folder under ``root`` (named after what it is made of, so a rerun resumes it and
    other settings get their own) with links to ``photos`` and their edited copies up to
    ``n`` images; beside it, ``<folder>.groups.csv`` (``image,group``): a photo and its
    copies are a group (``evaluation.dedupe``). Return the folder."""
    folder = root / f"images-{digest([str(p.resolve()) for p in photos], n, seed)}"
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(folder)
    links = [folder / f"P{k:06d}{photo.suffix.lower()}" for k, photo in enumerate(photos[:n])]
    for link, photo in zip(links, photos, strict=False):
        if not link.is_symlink():
            link.symlink_to(photo.resolve())
    copies = [folder / f"E{number:06d}.jpg" for number in range(n - len(links))]
    todo = [(number, str(photos[number % len(photos)])) for number, path in enumerate(copies)
            if not path.exists()]
    for _ in parallel_map(edit_copies, [(chunk, str(folder), seed) for chunk in spread(todo, 64)],
                          desc="edited copies", unit="image", total=len(todo), weight=int):
        pass
    write_csv(truth_path(folder), ("image", "group"),
              [(link.name, f"G{k:06d}") for k, link in enumerate(links)]
              + [(copy.name, f"G{number % len(photos):06d}") for number, copy in enumerate(copies)])
    return folder


def truth_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.groups.csv")


def split(images: list[Path], root: Path) -> tuple[Path, Path]:
    """Folders of links: every ``QUERY_EVERY``-th image a query, the others references."""
    queries, references = root / "queries", root / "references"
    for folder in (queries, references):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for k, image in enumerate(images):
        target = queries if k % QUERY_EVERY == 0 else references
        (target / image.name).symlink_to(image.resolve())
    return queries, references


def stage_seconds(record: Path) -> dict[str, list[float]]:
    """Seconds and CPU seconds of each stage of a run's or a dedupe's record, summed."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for stage in json.loads(record.read_text())["stages"]:
        totals[stage["stage"]][0] += stage["seconds"]
        totals[stage["stage"]][1] += stage["cpu_seconds"]
    return dict(totals)


def timed(name: str, cmd: list[str], work: Path, record: Path) -> dict:
    """Run ``cmd`` cold (``work`` emptied first): its wall time, peak memory and stages."""
    shutil.rmtree(work, ignore_errors=True)
    run = measure(cmd, cwd=REPO_ROOT)
    if run.returncode:
        raise SystemExit(f"{name} failed (exit {run.returncode})")
    stages = stage_seconds(record)
    return {"command": name, "seconds": run.seconds, "peak_rss_mb": run.peak_rss_mb,
            "cpu_seconds": sum(c for _, c in stages.values()), "stages": stages}


def table(rows: list[dict], n_images: int, n_queries: int) -> str:
    """The Markdown table: both commands' totals, then stage by stage."""
    run, dedupe = rows
    lines = [f"{n_images:,} images; run: {n_queries:,} queries against "
             f"{n_images - n_queries:,} references.", "",
             "| | run | dedupe | dedupe / run |", "|---|---|---|---|"]
    for key, label in (("seconds", "wall s"), ("cpu_seconds", "CPU s in the stages"),
                       ("peak_rss_mb", "peak RSS MB")):
        lines.append(f"| {label} | {run[key]:.1f} | {dedupe[key]:.1f} | "
                     f"**{dedupe[key] / run[key]:.2f}** |")
    for stage in sorted(set(run["stages"]) | set(dedupe["stages"])):
        a, b = (r["stages"].get(stage, [0.0, 0.0])[0] for r in rows)
        lines.append(f"| {stage}, s | {a:.1f} | {b:.1f} | {b / a:.2f} |" if a else
                     f"| {stage}, s | - | {b:.1f} | |")
    return "\n".join(lines)


def bench(n: int, photos: list[Path], work: Path) -> str:
    """Make the folder, time both commands on it; return the table."""
    if n < 2:
        raise ValueError(f"--n {n}: a folder to deduplicate needs two images or more")
    readable = [p for folder in photos for p in readable_photos(folder)]
    if not readable:
        raise ValueError(f"no readable photo in {', '.join(map(str, photos))}")
    folder = make_folder(readable, n, work)
    images = sorted(folder.iterdir())
    queries, references = split(images, work)
    rows = [timed("copydet run", [*COPYDET, "run", "--queries", str(queries), "--references",
                                  str(references), "--work", str(work / "run")],
                  work / "run", work / "run" / "pipeline.json"),
            timed("copydet dedupe", [*COPYDET, "dedupe", "--images", str(folder),
                                     "--work", str(work / "dedupe"), "--out",
                                     str(work / "dedupe" / "out")],
                  work / "dedupe", work / "dedupe" / "out" / "dedupe.json")]
    found = evaluate(*read_output(work / "dedupe" / "out"), truth_path(folder))
    n_queries = len(list(queries.iterdir()))
    write_json(work / "results.json", {"n_images": len(images), "n_queries": n_queries,
                                       "rows": rows, "dedupe_metrics": found})
    return "\n".join([table(rows, len(images), n_queries), "",
                      "copydet dedupe on this folder (a photo and its copies a group): " +
                      ", ".join(f"{k} {v:.4g}" for k, v in found.items())])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="images in the folder")
    parser.add_argument("--photos", type=Path, nargs="+", default=list(PHOTOS),
                        help="folders of photos (default: the training photos)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "work" / "dedupe-scale")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: print(bench(args.n, args.photos, args.work)))


if __name__ == "__main__":
    sys.exit(main())
