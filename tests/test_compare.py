"""copa compare on hand-made run folders (report.json + predictions/<arm>.jsonl): a known paired
difference comes out with the interval of the per-row differences, rows matched by content
whatever their order; runs with other test rows or another metric are refused in one line,
exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from copa.cli import cli
from copa.stats import bootstrap_ci, summarize
from copa.use.compare import compare, html, png

N = 20
A_BASELINE = [1.0 if i % 3 == 0 else 0.0 for i in range(N)]  # 7 of 20 right
A_COMBINED = [1.0 if i % 2 == 0 else 0.0 for i in range(N)]
FLIPPED = [1, 3, 5, 7, 9]  # rows B gets right and A got wrong: +5 of 20 = +25 points
B_BASELINE = list(A_BASELINE)
B_COMBINED = [1.0 if i in FLIPPED else s for i, s in enumerate(A_COMBINED)]


def _rows(n: int = N, offset: int = 0) -> list[dict[str, Any]]:
    return [{"inputs": {"text": f"row {i + offset}"}, "gold": "pos" if i % 2 else "neg"}
            for i in range(n)]


def make_run(folder: Path, scores: dict[str, list[float]], rows: list[dict[str, Any]],
             metric: str = "label_accuracy", shuffle: int | None = None) -> Path:
    """A finished run's files as copa writes them (report.json from copa.stats.summarize)."""
    folder.mkdir(parents=True)
    (folder / "predictions").mkdir()
    order = list(range(len(rows)))
    if shuffle is not None:  # the same rows, scored in another order
        random.Random(shuffle).shuffle(order)
    for arm, values in scores.items():
        lines = [{**rows[i], "prediction": "x", "score": values[i]} for i in order]
        (folder / "predictions" / f"{arm}.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))
    report = {"recipe": folder.name, "metric": metric, "test_rows": len(rows),
              **summarize(scores, resamples=200, seed=0)}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a = make_run(tmp_path / "a", {"baseline": A_BASELINE, "combined": A_COMBINED}, _rows())
    b = make_run(tmp_path / "b", {"baseline": B_BASELINE, "combined": B_COMBINED}, _rows(),
                 shuffle=3)
    return a, b


def test_a_known_paired_difference_and_its_interval(two_runs: tuple[Path, Path]) -> None:
    """B's combined arm is right on 5 more of the 20 rows: +25 points. With the rows matched,
    the paired bootstrap of B − A is the bootstrap of the per-row differences (the same
    resampled rows for both runs), so its interval equals bootstrap_ci of those differences;
    the baseline arms are identical row by row: 0 with a [0, 0] interval."""
    a, b = two_runs
    data = compare([a, b], resamples=500, seed=0)
    combined = data["arms"]["combined"]["differences"][str(b)]
    assert combined["value"] == pytest.approx(0.25)
    per_row = [y - x for x, y in zip(A_COMBINED, B_COMBINED)]
    assert combined["ci95"] == pytest.approx(list(bootstrap_ci(per_row, 500, 0)))
    assert combined["excludes_zero"] and combined["ci95"][0] > 0
    baseline = data["arms"]["baseline"]["differences"][str(b)]
    assert baseline == {"value": 0.0, "ci95": [0.0, 0.0], "excludes_zero": False}
    assert data["test_rows"] == N
    # side by side: each run's own score as its report gives it
    assert data["arms"]["combined"]["runs"][str(b)]["score"] == pytest.approx(15 / 20)


def test_the_cli_prints_the_table_json_html_and_png(two_runs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    a, b = two_runs
    runner = CliRunner()
    out = runner.invoke(cli, ["compare", str(a), str(b), "--bootstrap", "500",
                              "--html", str(tmp_path / "c.html"), "--png", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    line = next(row for row in out.output.splitlines() if row.startswith("combined"))
    assert "+25.0*" in line and "75.0 [" in line
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "c.html").read_text()
    assert "<svg" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    as_json = runner.invoke(cli, ["compare", str(a), str(b), "--json", "--bootstrap", "500"])
    assert json.loads(as_json.output)["arms"]["combined"]["differences"][str(b)]["value"] \
        == pytest.approx(0.25)


@pytest.mark.parametrize("case", ["other rows", "another metric", "not finished"])
def test_runs_that_cannot_be_paired_are_refused_in_one_line(case: str, tmp_path: Path,
                                                            two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    if case == "other rows":  # one test row differs: another split
        other = make_run(tmp_path / "c", {"baseline": A_BASELINE}, _rows()[:-1] + _rows(1, 99))
        said = "do not share test rows"
    elif case == "another metric":
        other = make_run(tmp_path / "c", {"baseline": A_BASELINE}, _rows(), metric="exact_match")
        said = "compares runs scored with one metric"
    else:
        other = tmp_path / "c"
        other.mkdir()
        said = "no report.json"
    out = CliRunner().invoke(cli, ["compare", str(a), str(other)])
    assert out.exit_code == 2
    assert said in out.output and len(out.output.strip().splitlines()) == 1
    assert "Traceback" not in out.output


def test_the_html_and_png_views_are_built_from_the_data(two_runs: tuple[Path, Path]) -> None:
    data = compare(list(two_runs), resamples=200)
    assert png(data)[:4] == b"\x89PNG"
    assert "+25.0" in html(data)


@pytest.mark.parametrize("damage, said", [
    ("cut mid-line", "combined.jsonl: line 3: not a JSON line"),
    ("cut at a line boundary", "combined.jsonl: 5 rows, but"),
    ("cut, no count in the report", "combined.jsonl: its test rows differ from baseline.jsonl's"),
    ("score not a number", "combined.jsonl: line 2: score \"x\" is not a finite number"),
    ("score null", "combined.jsonl: line 2: score null is not a finite number"),
    ("no gold", "combined.jsonl: line 1: no gold"),
    ("report score not a number", "report.json: arms.combined: score or ci95 is not a number"),
])
def test_damaged_predictions_are_one_line_naming_the_file(
        damage: str, said: str, two_runs: tuple[Path, Path]) -> None:
    """A damaged predictions file in the second run's second arm (the first arm alone was
    checked before: a cut arm failed with a KeyError) is refused in one line, exit 2."""
    a, b = two_runs
    path = b / "predictions" / "combined.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "cut mid-line":
        path.write_text("".join(lines[:2]) + lines[2][:20])
    elif damage.startswith("cut"):
        path.write_text("".join(lines[:5]))
        if "no count" in damage:  # then the rows themselves must match the other arms'
            report = json.loads((b / "report.json").read_text())
            for data in report["arms"].values():
                del data["n"]
            (b / "report.json").write_text(json.dumps(report))
    elif damage.startswith("report"):  # the side-by-side prints the report's own scores
        report = json.loads((b / "report.json").read_text())
        report["arms"]["combined"]["score"] = "x"
        (b / "report.json").write_text(json.dumps(report))
        path = b / "report.json"
    elif damage == "no gold":
        row = json.loads(lines[0])
        del row["gold"]
        path.write_text(json.dumps(row) + "\n" + "".join(lines[1:]))
    else:
        row = json.loads(lines[1])
        row["score"] = "x" if "number" in damage else None
        path.write_text(lines[0] + json.dumps(row) + "\n" + "".join(lines[2:]))
    out = CliRunner().invoke(cli, ["compare", str(a), str(b)])
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"copa compare: {path.parent}/") and said in out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output


def test_a_damaged_cached_arm_is_scored_again(tmp_path: Path) -> None:
    """The evaluate stage's cache reads predictions with the same checked reader: a file cut
    since it was written is no cache hit (scored again), not a crash or a short arm."""
    from copa.stages.evaluate import _cached_scores

    (tmp_path / "baseline.key").write_text("k\n")
    rows = "".join(json.dumps({**r, "prediction": "x", "score": 1.0}) + "\n" for r in _rows(3))
    (tmp_path / "baseline.jsonl").write_text(rows)
    assert _cached_scores(tmp_path, "baseline", "k") == [1.0, 1.0, 1.0]
    (tmp_path / "baseline.jsonl").write_text(rows[:-10])
    assert _cached_scores(tmp_path, "baseline", "k") is None
