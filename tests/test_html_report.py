"""report.html, study.html and copa compare's page in a real browser: Debian's headless Chromium
(`apt-get install chromium`; .ci/run installs it) loads each page from disk with no network,
runs its script, and the test reads the DOM Chromium dumps afterwards (not the file copa wrote):
the tables were built, the predictions table filters to the wrong answers and sorts from the
address's #fragment, and a screenshot is taken. No browser is downloaded at test time; without
Chromium these tests fail and say how to install it."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from copa.stages.report import write_report
from copa.stats import summarize

ARMS = {"baseline": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "finetune_only": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        "prompt_only": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], "combined": [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]}
WRONG = sum(s < 1 for scores in ARMS.values() for s in scores)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium on PATH: install Debian's package (apt-get install -y "
                    "chromium); the HTML pages are tested in a real browser")
    return found


def browser(url: str, tmp: Path, *args: str) -> str:
    """Chromium headless on a file:// address; returns stdout (the DOM with --dump-dom)."""
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args, url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Tables(HTMLParser):
    """Each table's rows (by table id): the row's attributes and its cells' text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.body: dict[str, str] = {}
        self._table: list[str] = []
        self._row: dict[str, Any] | None = None
        self._in_cell = False
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        elif tag == "table":
            self._table.append(a.get("id") or "")
            self.tables.setdefault(self._table[-1], [])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self._row = {"attrs": a, "cells": []}
            self.tables[self._table[-1]].append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
        elif tag == "tbody":
            self._in_body = False
        elif tag == "tr":
            self._row = None
        elif tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._row is not None:
            self._row["cells"][-1] += data


def dom(url: str, tmp: Path) -> Tables:
    parsed = Tables()
    parsed.feed(browser(url, tmp, "--dump-dom"))
    return parsed


def make_run(folder: Path) -> Path:
    """A finished run's files as the evaluate stage writes them, report.html included."""
    (folder / "predictions").mkdir(parents=True)
    (folder / "train").mkdir()
    for arm, scores in ARMS.items():
        rows = [{"inputs": {"text": f"flower {i} <b>not bold</b>"}, "gold": "setosa",
                 "prediction": "setosa" if s else "virginica", "score": s}
                for i, s in enumerate(scores)]
        (folder / "predictions" / f"{arm}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train" / "progress.jsonl").write_text("".join(
        json.dumps({"event": "step", "step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 9)))
    report = {"recipe": "iris", "metric": "label_accuracy", "test_rows": 6,
              **summarize(ARMS, resamples=200, seed=0),
              "prompt_optimization": {"combined": {
                  "winner": "optimized", "demos": 1, "val_scores": {"plain": 0.5,
                                                                    "optimized": 0.75},
                  "candidates": [{"source": "random search seed -3", "val_score": 0.5,
                                  "demos": 0, "instructions": ["Name the species."]},
                                 {"source": "random search seed 0", "val_score": 0.75,
                                  "demos": 1, "instructions": ["Name the species."]}]}},
              "val": {"rows": 4, "best_arm": "combined", "scores": {"combined": 0.75}},
              "prompt_sent": {"combined": {"messages": [
                  {"role": "system", "content": "Name the species.\n  (setosa, versicolor)"},
                  {"role": "user", "content": "petal_length: 1.4"}]}},
              "versions": {"copa": "0"}}
    write_report(folder, report)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("html") / "run")


def test_report_html_renders_its_tables_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = run_dir / "report.html"
    found = dom(page.as_uri(), tmp_path)
    assert found.body.get("data-ready") == "1"  # the page's script ran to its end
    predictions = found.tables["predictions"]
    assert len(predictions) == sum(len(s) for s in ARMS.values())  # built from the JSON
    assert not any("hidden" in r["attrs"] for r in predictions)
    assert [r["cells"][0] for r in found.tables["arms"]] == list(ARMS)
    assert [r["cells"][0] for r in found.tables["candidates-combined"]] == [
        "random search seed -3", "random search seed 0"]
    assert "flower 0 <b>not bold</b>" in predictions[0]["cells"][2]  # text, never markup
    text = page.read_text()
    assert "<svg" in text and "src=\"http" not in text and "href=\"http" not in text


def test_the_predictions_filter_to_wrong_answers_and_sort(run_dir: Path, tmp_path: Path) -> None:
    url = (run_dir / "report.html").as_uri()
    wrong = dom(url + "#wrong=1", tmp_path).tables["predictions"]
    shown = [r for r in wrong if "hidden" not in r["attrs"]]
    assert len(shown) == WRONG
    assert all(float(r["cells"][5]) < 1 for r in shown)
    ranked = dom(url + "#sort=score&desc=1", tmp_path).tables["predictions"]
    scores = [float(r["cells"][5]) for r in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


def test_a_screenshot_of_report_html(run_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    browser((run_dir / "report.html").as_uri(), tmp_path, f"--screenshot={shot}",
            "--window-size=1200,1800", "--hide-scrollbars")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_study_html_and_compare_html_render(tmp_path: Path) -> None:
    from copa.study.page import html as study_html
    from copa.use.compare import compare
    from copa.use.compare import html as compare_html

    other = make_run(tmp_path / "other")
    page = tmp_path / "compare.html"
    page.write_text(compare_html(compare([make_run(tmp_path / "one"), other])))
    assert len(dom(page.as_uri(), tmp_path).tables["compare"]) == len(ARMS)
    cell = {"cell": "lr=0.001", "status": "finished", "seeds": [0, 1], "values": {"lr": 0.001},
            "arms": {a: {"mean": 0.5, "ci95": [0.3, 0.7]} for a in ARMS},
            "effects": {"synergy": {"value": 0.1, "ci95": [-0.1, 0.3], "excludes_zero": False}}}
    data = {"study": "s", "recipe": "iris.yaml", "metric": "label_accuracy",
            "grid": {"lr": [0.001]}, "seeds": [0, 1], "arms": list(ARMS), "bootstrap": 200,
            "method": "m", "cells": [cell], "findings": ["lr=0.001: synergy includes 0"],
            "runs": [{"cell": "lr=0.001", "seed": 0, "status": "finished", "test_rows": 6,
                      "scores": {a: 0.5 for a in ARMS}}]}
    page = tmp_path / "study.html"
    page.write_text(study_html(data))
    found = dom(page.as_uri(), tmp_path)
    assert [r["cells"][0] for r in found.tables["cells"]] == ["lr=0.001"]
    assert len(found.tables["runs"]) == 1 and len(found.tables["effects"]) == 1
