"""The page of a deduplication (``copydet dedupe``): ``<out>/report/index.html``.

The run (folder, counts, threshold, grouping and keep rules, stage times, skipped inputs)
and the groups: each a contact sheet of thumbnails (long side ``THUMB`` px) with the kept
image marked and the pair scores among its members, biggest groups first. The groups travel
as JSON inside the page and are drawn ``PER_PAGE`` at a time, thumbnails loading lazily, so
thousands of groups stay light; a box filters them by image name. Self-contained (opens from
``file://``), built under a temporary name and renamed into place (``page.building``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from common.images import ImageError, read_image, resize_long_side
from evaluation.report.page import building, render

THUMB = 160
PER_PAGE = 40
MAX_PAIRS_SHOWN = 15  # pair scores listed per group


def thumbnail(path: Path, out: Path) -> bool:
    """A JPEG thumbnail of ``path`` at ``out``; False where the image cannot be read."""
    try:
        rgb, _ = read_image(path, "RGB", min_side=THUMB)
    except ImageError:
        return False
    Image.fromarray(resize_long_side(rgb, THUMB)).save(out, format="JPEG", quality=80)
    return True


def group_data(groups: Sequence[Sequence[str]], scores: dict[tuple[str, str], float],
               thumbs: dict[str, str]) -> list[dict[str, Any]]:
    """What the page draws of each group: members (id, thumbnail, kept) and pair scores."""
    data = []
    for n, members in enumerate(groups, 1):
        pairs = sorted(((a, b, scores[(a, b)]) for i, a in enumerate(sorted(members))
                        for b in sorted(members)[i + 1:] if (a, b) in scores),
                       key=lambda t: -t[2])
        data.append({"group": f"G{n:05d}",
                     "members": [[m, thumbs.get(m, ""), int(k == 0)]
                                 for k, m in enumerate(members)],
                     "pairs": [[a, b, round(s, 4)] for a, b, s in pairs[:MAX_PAIRS_SHOWN]],
                     "n_pairs": len(pairs)})
    return data


def write_page(out: Path, record: dict[str, Any], groups: Sequence[Sequence[str]],
               pairs: Sequence[tuple[str, str, float]], paths: dict[str, Path],
               threads: int = 2) -> Path:
    """Write ``<out>/report/index.html`` for a deduplication (its groups and scored pairs);
    return it."""
    scores = {(a, b): score for a, b, score in pairs}
    grouped = [m for g in groups for m in g]
    with building(out / "report") as folder:
        (folder / "thumbs").mkdir()
        names = {m: f"thumbs/{i:06d}.jpg" for i, m in enumerate(grouped)}
        with ThreadPoolExecutor(threads) as pool:
            made = list(pool.map(lambda m: thumbnail(paths[m], folder / names[m]), grouped))
        thumbs = {m: names[m] for m, ok in zip(grouped, made, strict=True) if ok}
        data = json.dumps(group_data(groups, scores, thumbs)).replace("</", "<\\/")
        context = {"record": record, "n_groups": len(groups), "n_grouped": len(grouped),
                   "data": data, "per_page": PER_PAGE, "thumb": THUMB,
                   "stages": record.get("stages", [])}
        (folder / "index.html").write_text(render(context, "dedupe.html.j2"), encoding="utf-8")
    return out / "report" / "index.html"
