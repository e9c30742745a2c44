"""The HTML report of a run: its content (parsed), its robustness, and a real headless browser."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections import Counter
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from common import UserError
from common.config import REPO_ROOT, load_config
from common.io import read_csv
from evaluation import report
from evaluation.by_edit import subset_metrics
from evaluation.isc_metric import (
    Metrics,
    Predictions,
    evaluate,
    load_ground_truth,
    load_predictions,
)
from match_score.visualize import project_border
from tests.conftest import DATA, python


def demo_run(tmp_path: Path) -> Path:
    """Run the pipeline on the demo data into ``tmp_path/work`` (its run record
    ``pipeline.json`` and the fused pairs' features); return the work folder."""
    queries, references = (DATA / "queryimages").resolve(), (DATA / "referenceimages").resolve()
    work = (tmp_path / "work").resolve()
    pipeline.run(load_config(), queries, references, work)
    return work


# --------------------------------------------------------------------------- helpers


class Page(HTMLParser):
    """What the tests read from a report page: ids, links, metric cells, cards, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.sources: list[str] = []  # src and href attributes
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}  # (row, metric) -> value, text
        self.cards: list[tuple[str, str, str]] = []  # (group, query, reference)
        self.hidden: list[tuple[str, str]] = []  # (query, reference) of hidden cards
        self.headings: list[str] = []
        self.scripts: list[str] = []
        self._row = self._group = ""
        self._cell: tuple[str, str] | None = None
        self._text: list[str] = []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.sources.append(a[key])
        if tag == "tr":
            self._row = a.get("data-run") or a.get("data-kind") or ""
        if tag == "div" and "data-group" in a:
            self._group = a["data-group"]
        if tag == "article":
            self.cards.append((self._group, a["data-query"], a["data-reference"]))
            if "hidden" in a:
                self.hidden.append((a["data-query"], a["data-reference"]))
        if tag == "td" and "data-metric" in a:
            self._cell = (a["data-metric"], a.get("data-value", ""))
            self._text = []
        if tag in ("h3", "script"):
            self._in, self._text = tag, []

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell:
            self.cells[(self._row, self._cell[0])] = (self._cell[1], "".join(self._text).strip())
            self._cell = None
        if tag == self._in == "h3":
            self.headings.append("".join(self._text).strip())
        if tag == self._in == "script":
            self.scripts.append("".join(self._text))
        if tag == self._in:
            self._in = None


def submitted_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def read_page(index: Path) -> Page:
    return Page(index.read_text(encoding="utf-8"))


def branch_alone(pairs: Path) -> Predictions:
    """A branch's own best score per pair, read independently of the report."""
    best: dict[tuple[str, str], float] = {}
    with open(pairs, newline="") as f:
        for row in csv.DictReader(f):
            pair = (row["query_id"], row["reference_id"])
            best[pair] = max(best.get(pair, -np.inf), float(row["score"]))
    return Predictions.from_rows([(q, r, s) for (q, r), s in best.items()])


def check_metrics(page: Page, row: str, m: Metrics) -> None:
    for name in ("micro_ap", "recall_at_p90", "recall_at_rank1"):
        value, text = page.cells[(row, name)]
        assert float(value) == getattr(m, name), (row, name)
        assert text == f"{getattr(m, name):.4f}", (row, name)


def check_files(index: Path, page: Page) -> None:
    """Every picture and link of the page is a local file that exists; nothing remote."""
    for ref in page.sources:
        assert "//" not in ref and not ref.startswith("data:"), ref
        if ref.startswith("#"):
            continue
        assert (index.parent / ref).is_file(), ref
    text = index.read_text(encoding="utf-8")
    assert "<link" not in text and "@import" not in text and "url(" not in text


def fake_run(work: Path, rows: list[tuple[str, str, float]]) -> Path:
    """A run record without feature stores (nothing to draw) and the given submission."""
    work.mkdir(parents=True, exist_ok=True)
    sub = work / "submission.csv"
    with open(sub, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("query_id", "reference_id", "score"),
                                                      *((q, r, f"{s:.6f}") for q, r, s in rows)])
    record = {"queries": str(work / "q"), "references": str(work / "r"), "config": load_config(),
              "stages": [{"stage": "merge.fuse", "label": "fusion", "output": str(sub),
                          "seconds": 1.5}],
              "branches": {"local": {"pairs": str(work / "none.csv"),
                                     "query_store": str(work / "qs"),
                                     "reference_store": str(work / "rs")}},
              "features": str(work / "features.csv"), "submission": str(sub),
              "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:02+00:00"}
    (work / "pipeline.json").write_text(json.dumps(record))
    return work


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_run(tmp_path_factory.mktemp("report-demo"))


@pytest.fixture(scope="session")
def demo_page(demo_work: Path) -> Path:
    return report.main(demo_work, DATA / "gt.csv", DATA / "edits.csv")


# --------------------------------------------------------------------------- the demo's page


@pytest.mark.slow
def test_page_has_every_section_and_the_metric_code_numbers(demo_work: Path,
                                                            demo_page: Path) -> None:
    assert demo_page == demo_work / "report" / "index.html"
    page = read_page(demo_page)
    assert {"run", "sets", "counts", "stages", "metrics", "metrics-table", "edits-table",
            "pairs", "predictions", "pred-table", "skipped", "settings", "filter"} <= page.ids
    record = json.loads((demo_work / "pipeline.json").read_text())
    gt = load_ground_truth(DATA / "gt.csv")
    fused = evaluate(load_predictions(record["submission"]), gt)
    check_metrics(page, "fused", fused)
    for name, entry in record["branches"].items():
        check_metrics(page, name, evaluate(branch_alone(Path(entry["pairs"])), gt))
    check_metrics(page, "all", fused)
    edits = {r["query_id"]: r["edits"] for r in read_csv(DATA / "edits.csv")}
    _, rot = subset_metrics(load_predictions(record["submission"]), gt, edits, ["rot"])
    check_metrics(page, "rot", rot)
    text = demo_page.read_text()
    for stage in record["stages"]:
        assert stage["stage"] in text
    assert "No input was skipped" in text
    submitted = submitted_rows(Path(record["submission"]))
    table = json.loads(page.scripts[0])  # the predictions table's data: best pair first
    per_query = Counter(q for q, _, _ in submitted)
    assert table[0][:2] == submitted[0][:2]
    assert len(table) == sum(min(n, report.PER_QUERY) for n in per_query.values())


@pytest.mark.slow
def test_demo_pairs_are_drawn_and_every_file_exists(demo_work: Path, demo_page: Path) -> None:
    page = read_page(demo_page)
    check_files(demo_page, page)
    gt = load_ground_truth(DATA / "gt.csv")
    groups = Counter(g for g, _, _ in page.cards)
    assert set(groups) == {"highest-scoring non-copies", "missed or lowest-scoring copies"}
    assert all(n <= report.N_PAIRS for n in groups.values())
    for group, q, r in page.cards:
        assert ((q, r) in gt.positives) == group.startswith("missed"), (group, q, r)
    pictures = sorted(demo_page.parent.glob("pair-*.jpg"))
    assert 0 < len(pictures) <= 4 * report.N_PAIRS  # a picture and its thumbnail per pair
    assert {p.name for p in pictures} == {s for s in page.sources if s.startswith("pair-")}
    with Image.open(pictures[0]) as im:
        assert im.format == "JPEG" and im.height > 100
    assert (demo_page.parent / "pr_curve.png").is_file()
    assert (demo_page.parent / "scores.png").is_file()
    text = demo_page.read_text()
    assert "local_logit" in text and "global_sim" in text and "crop_local_logit" in text
    assert not list(demo_work.glob("report.tmp-*")) and not list(demo_work.glob("report.old-*"))


@pytest.mark.slow
def test_demo_page_without_ground_truth(demo_work: Path, tmp_path: Path) -> None:
    index = report.main(demo_work, out=tmp_path / "nogt")
    page = read_page(index)
    check_files(index, page)
    assert "metrics-table" not in page.ids and "pairs" in page.ids
    assert not (index.parent / "pr_curve.png").exists() and (index.parent / "scores.png").exists()
    groups = Counter(g for g, _, _ in page.cards)
    assert set(groups) == {"top pairs", f"around the score {report.THRESHOLD:g}"}
    record = json.loads((demo_work / "pipeline.json").read_text())
    submitted = submitted_rows(Path(record["submission"]))
    top = [c for c in page.cards if c[0] == "top pairs"]
    assert [(q, r) for _, q, r in top] == [(q, r) for q, r, _ in submitted[:len(top)]]


# --------------------------------------------------------------------------- robustness


def test_empty_submission_with_and_without_ground_truth(tmp_path: Path) -> None:
    work = fake_run(tmp_path / "work", [])
    page = read_page(report.main(work))
    assert "No pair to show" in (work / "report" / "index.html").read_text()
    assert not page.cards and json.loads(page.scripts[0]) == []
    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\nQ1,R1\nQ2,\n")
    index = report.main(work, gt)
    page = read_page(index)
    check_files(index, page)
    m = evaluate(load_predictions(work / "submission.csv"), load_ground_truth(gt))
    check_metrics(page, "fused", m)
    assert page.cards == [("missed or lowest-scoring copies", "Q1", "R1")]
    assert "missed: not in the submission" in index.read_text()


def test_skipped_inputs_are_listed_once_with_their_reason(tmp_path: Path) -> None:
    work = fake_run(tmp_path / "work", [("Q1", "R1", 0.9)])
    (work / "qs").mkdir()
    (work / "qs" / "skipped.csv").write_text("id,path,reason\nQ7,/q/Q7.jpg,truncated JPEG\n")
    stamp = datetime.fromisoformat("2026-01-01T00:00:01+00:00").astimezone()
    run = work / "runs" / f"{stamp:%Y%m%d-%H%M%S}-local_fea.extract-q-123"
    old = work / "runs" / "20200101-000000-local_fea.extract-q-99"  # another run's
    for folder, rows in ((run, "Q7,/q/Q7.jpg,truncated JPEG\nR5,/r/R5.png,not an image\n"),
                         (old, "Q9,/q/Q9.jpg,zero bytes\n")):
        folder.mkdir(parents=True)
        (folder / "skipped.csv").write_text(f"item,path,reason\n{rows}")
        (folder / "run.log").write_text("log\n")
    index = report.main(work)
    text = index.read_text()
    check_files(index, read_page(index))
    assert "truncated JPEG" in text and "not an image" in text and "zero bytes" not in text
    assert text.count("/q/Q7.jpg") == 1 and run.name in text and old.name not in text


def test_edits_need_ground_truth(tmp_path: Path) -> None:
    work = fake_run(tmp_path / "work", [])
    with pytest.raises(UserError, match="--edits needs --gt"):
        report.main(work, edits=DATA / "edits.csv")


def test_large_run_stays_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_queries = 50_000
    rows = [(f"Q{q:06d}", f"R{q * 3 + k:07d}", float(s)) for q in range(n_queries)
            for k, s in enumerate(np.sort(rng.random(3))[::-1])]
    work = fake_run(tmp_path / "work", rows)
    index = report.main(work)
    page = read_page(index)
    assert index.stat().st_size < 5_000_000
    assert len(page.cards) <= 2 * report.N_PAIRS
    table = json.loads(page.scripts[0])
    assert len(table) == report.MAX_TABLE_ROWS
    assert {r[3] for r in table} == {1}  # the best reference of every query first


def test_a_failed_report_leaves_the_previous_one(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    work = fake_run(tmp_path / "work", [("Q1", "R1", 0.9), ("Q1", "R2", 0.2)])
    index = report.main(work)
    before = index.read_text()

    def broken(context: dict) -> str:
        raise RuntimeError("killed midway")

    monkeypatch.setattr(report, "render", broken)
    with pytest.raises(RuntimeError):
        report.main(work, out=work / "report")
    assert index.read_text() == before
    assert [p.name for p in work.iterdir() if p.name.startswith("report")] == ["report"]


def test_an_existing_folder_that_is_no_report_is_never_replaced(tmp_path: Path) -> None:
    """``--out`` naming a folder of the user's (or the work folder itself) is refused: a
    report replaces its whole folder."""
    work = fake_run(tmp_path / "work", [("Q1", "R1", 0.9)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, work):
        with pytest.raises(UserError, match="not a report folder"):
            report.main(work, out=out)
    assert (mine / "notes.txt").read_text() == "keep me" and (work / "pipeline.json").exists()
    assert report.main(work, out=tmp_path / "new").exists()


@pytest.mark.parametrize("content", [None, "{not json", "[]", '{"queries": "q"}'])
def test_missing_or_unreadable_record_is_a_one_line_error(tmp_path: Path,
                                                         content: str | None) -> None:
    if content is not None:
        (tmp_path / "pipeline.json").write_text(content)
    done = subprocess.run([python(), "-m", "evaluation.report", "--work", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pipeline.json" in lines[0]


def test_overlap_outline_maps_the_border() -> None:
    scale = np.diag([2.0, 2.0, 1.0])
    corners = project_border(scale, 10, 5)
    assert np.allclose(corners, [[-1, -1], [19, -1], [19, 9], [-1, 9]])
    fold = np.array([[1.0, 0, 0], [0, 1, 0], [-0.5, 0, 1]])  # the line x = 2 goes to infinity
    assert project_border(fold, 10, 5) is None


# --------------------------------------------------------------------------- a real browser


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser") if shutil.which(b)), None)


def _headless(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
             "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180)


def console_messages(stderr: str) -> list[str]:
    """The page's console messages (errors included) in a Chromium log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None,
                    reason="chromium is not installed (apt-get install chromium): no browser test")
def test_page_in_a_headless_browser(demo_page: Path, tmp_path: Path) -> None:
    browser = _browser()
    assert browser is not None
    shot = tmp_path / "shot.png"
    done = _headless(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                     demo_page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), np.float64)
    assert grey.shape == (1600, 1200) and grey.std() > 20  # not blank
    # the script ran: the table is paged, and ?q= filters the pictures and the table
    dom = _headless(browser, tmp_path, "--dump-dom", demo_page.as_uri())
    assert console_messages(dom.stderr) == []
    assert "rows 1–50 of" in dom.stdout
    page = read_page(demo_page)
    assert not page.hidden
    query = page.cards[0][1]
    dom = _headless(browser, tmp_path, "--dump-dom", f"{demo_page.as_uri()}?q={query}")
    assert console_messages(dom.stderr) == []
    filtered = Page(dom.stdout)
    shown = [(q, r) for _, q, r in filtered.cards if (q, r) not in filtered.hidden]
    assert shown and all(q == query for q, _ in shown)
    assert len(filtered.hidden) == sum(q != query for _, q, _ in filtered.cards) > 0
    assert "picture(s)" in dom.stdout
