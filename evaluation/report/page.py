"""The page: renders templates/report.html.j2 in a build folder, renamed onto the report."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import UserError
from common.io import is_stale_tmp, output_error

TEMPLATES = Path(__file__).resolve().parent / "templates"
MARKER = ".copydet-report"  # in every report folder: only such a folder is ever replaced


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out``, renamed onto ``out`` if the block succeeds."""
    if out.exists() and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not a report folder: give another --out (a "
                        "report replaces its whole folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f"{out.name}.tmp-*"), *out.parent.glob(f"{out.name}.old-*")]:
        if is_stale_tmp(stale.with_name(stale.name.replace(".old-", ".tmp-"))):  # killed build
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / MARKER).write_text("a report of copydet: this folder is replaced by the next "
                                  "one\n")
        yield tmp
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if (named := output_error(err, tmp, out)) is not None:  # name the report's file
            raise named from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render(context: dict[str, Any], template: str = "report.html.j2") -> str:
    """The page from ``templates/<template>`` (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = lambda v, d=4: "—" if v is None else f"{v:.{d}f}"
    env.filters["count"] = lambda v: "—" if v is None else f"{v:,}"
    return env.get_template(template).render(**context)
