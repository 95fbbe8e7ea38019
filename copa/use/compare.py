"""copa compare: the arms of several finished runs side by side, and for runs scored on the same
test rows, each run's difference from the first run, arm by arm, with a paired-bootstrap
interval (copa.stats.paired_differences: the report's own statistics, the same resampled rows
for every run). Reads report.json and predictions/<arm>.jsonl; nothing heavy.

Rows are matched by content (a hash of each row's inputs and gold answer), so the order they
were scored in does not matter; runs whose test rows differ (another split seed, other data)
are refused with the reason: an unpaired difference would not answer "did my change help?".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from copa.files import sha256_json
from copa.pngfigure import png_bytes, pyplot
from copa.registry import RECIPE_ARMS
from copa.stages.predictions import PredictionsError, finite_number, read_scored_arms, row_key
from copa.stats import paired_differences
from copa.use.bundle import NotFinished, check_finished

ARMS = RECIPE_ARMS  # the arms compared (copa.registry)
METHOD = ("each run minus the first run, arm by arm, on the test rows they share (matched by a "
          "hash of inputs and gold answer); 95% percentile interval of a paired bootstrap that "
          "resamples those rows, the same rows for every run (copa.stats.paired_differences)")


class CompareError(Exception):
    """Runs that cannot be compared (not finished, other test rows, other metric): one line."""


def read_run(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """One finished run: its report and, per scored arm, its rows' keys and scores (every arm's
    predictions checked by copa.stages.predictions.read_scored_arms)."""
    root = Path(path)
    report_path = root / "report.json"
    if not report_path.is_file():
        raise CompareError(f"{path}: no report.json: not a finished run (run `copa run` or "
                           "`copa evaluate` on it first)")
    try:
        check_finished(root)  # a stage before evaluate ran again since: not this run's scores
    except NotFinished as exc:
        raise CompareError(str(exc)) from None
    try:
        report = json.loads(report_path.read_text())
    except ValueError as exc:
        raise CompareError(f"{report_path}: not readable JSON ({exc})") from None
    try:
        scored = read_scored_arms(root, report)
    except PredictionsError as exc:
        raise CompareError(str(exc)) from None
    for arm, data in report["arms"].items():  # the side-by-side shows the report's own numbers
        ci = data.get("ci95")
        if not ((data.get("score") is None or finite_number(data["score"])) and (ci is None or (
                isinstance(ci, list) and len(ci) == 2 and all(finite_number(v) for v in ci)))):
            raise CompareError(f"{report_path}: arms.{arm}: score or ci95 is not a number: "
                               "not a report copa wrote (re-run `copa evaluate`)")
    arms = {arm: {"keys": [row_key(r) for r in rows], "scores": [float(r["score"]) for r in rows]}
            for arm, rows in scored.items()}
    keys = next(iter(arms.values()))["keys"] if arms else []
    return {"label": label or str(path), "dir": str(root), "report": report, "arms": arms,
            "test_hash": sha256_json(sorted(keys)), "test_keys": keys}


def _check_same_rows(runs: Sequence[dict[str, Any]]) -> None:
    first = runs[0]
    for other in runs[1:]:
        if other["report"].get("metric") != first["report"].get("metric"):
            raise CompareError(
                f"{first['label']} is scored with {first['report'].get('metric')} and "
                f"{other['label']} with {other['report'].get('metric')}: copa compare "
                "compares runs scored with one metric")
        if other["test_hash"] == first["test_hash"]:
            continue
        mine, theirs = Counter(first["test_keys"]), Counter(other["test_keys"])
        only_first = sum((mine - theirs).values())
        only_other = sum((theirs - mine).values())
        raise CompareError(
            f"{first['label']} and {other['label']} do not share test rows (test rows hash "
            f"{first['test_hash'][:12]} vs {other['test_hash'][:12]}: {len(first['test_keys'])} "
            f"vs {len(other['test_keys'])} rows, {only_first} only in the first, {only_other} "
            f"only in the second); a paired difference needs the same test rows: compare runs "
            "with the same data and data.splits")


def _aligned(run: dict[str, Any], arm: str, order: list[str]) -> list[float]:
    """The arm's scores in the order of `order` (row keys; a repeated row by occurrence)."""
    slots: dict[str, list[float]] = {}
    for key, score in zip(run["arms"][arm]["keys"], run["arms"][arm]["scores"], strict=True):
        slots.setdefault(key, []).append(score)
    taken: Counter[str] = Counter()
    out = []
    for key in order:
        out.append(slots[key][taken[key]])
        taken[key] += 1
    return out


def compare(paths: Sequence[str | Path], resamples: int = 1000, seed: int = 0,
            labels: Sequence[str] | None = None) -> dict[str, Any]:
    """copa compare's data: each run's arms (score, the report's interval) and, per arm every
    run scored, each run's paired difference from the first run."""
    if len(paths) < 2:
        raise CompareError("copa compare needs at least two run directories")
    labels = list(labels) if labels else [str(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise CompareError(f"runs given twice: {', '.join(labels)}")
    runs = [read_run(p, label) for p, label in zip(paths, labels, strict=True)]
    for run in runs:
        if not run["arms"]:
            raise CompareError(f"{run['label']}: no arm with a score (every arm failed)")
    _check_same_rows(runs)
    reference = runs[0]["label"]
    order = runs[0]["test_keys"]
    all_arms = [a for a in ARMS if any(a in r["report"].get("arms", {}) for r in runs)]
    all_arms += [a for r in runs for a in r["report"].get("arms", {}) if a not in all_arms]
    arms_out: dict[str, Any] = {}
    for arm in all_arms:
        entry: dict[str, Any] = {"runs": {}}
        for run in runs:
            data = run["report"].get("arms", {}).get(arm)
            entry["runs"][run["label"]] = None if data is None else {
                "score": data.get("score"), "ci95": data.get("ci95"),
                "failed": bool(data.get("failed"))}
        if all(arm in run["arms"] for run in runs):
            per_run = {run["label"]: _aligned(run, arm, order) for run in runs}
            entry["differences"] = paired_differences(per_run, reference, resamples, seed)
        else:
            entry["differences"] = None
            entry["why_no_difference"] = "not scored in every run"
        arms_out[arm] = entry
    return {"reference": reference, "metric": runs[0]["report"].get("metric"),
            "test_rows": len(order), "test_hash": runs[0]["test_hash"],
            "bootstrap": resamples, "seed": seed, "method": METHOD,
            "runs": [{"label": r["label"], "dir": r["dir"], "recipe": r["report"].get("recipe"),
                      "settings": r["report"].get("settings", {})} for r in runs],
            "arms": arms_out}


# ---- views -------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _score(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if entry.get("failed"):
        return "failed"
    ci = entry.get("ci95")
    return _pct(entry.get("score")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _difference(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    lo, hi = entry["ci95"]
    star = "*" if entry["excludes_zero"] else ""
    return f"{100 * entry['value']:+.1f}{star} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def table_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison as one table: per arm, each run's score [CI], then each other run's
    difference from the reference [CI]."""
    labels = [r["label"] for r in data["runs"]]
    others = labels[1:]
    headers = ["arm", *labels, *(f"{o} − {data['reference']}" for o in others)]
    rows = []
    for arm, entry in data["arms"].items():
        diffs = entry.get("differences") or {}
        rows.append([arm, *(_score(entry["runs"][label]) for label in labels),
                     *(_difference(diffs.get(o)) for o in others)])
    return headers, rows


def text(data: dict[str, Any]) -> str:
    """The terminal view: a header line, an aligned table and a legend."""
    headers, rows = table_rows(data)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [f"copa compare: {data['metric']} (percent) on {data['test_rows']} shared test rows "
             f"(rows hash {data['test_hash'][:12]}); reference {data['reference']}", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += ["", "score [95% CI] as in each run's report; difference in points [95% CI], "
              f"paired bootstrap, {data['bootstrap']} resamples; * = the interval excludes 0"]
    return "\n".join(lines) + "\n"


COLORS = ["#1e88e5", "#fb8c00", "#43a047", "#8e24aa", "#e53935", "#6d4c41"]


def html(data: dict[str, Any]) -> str:
    """A self-contained page: the arms of every run with intervals, the differences with
    theirs, and the table."""
    from copa.htmlpage import Bar, interval_chart, page, section, table

    labels = [r["label"] for r in data["runs"]]
    color = {label: COLORS[i % len(COLORS)] for i, label in enumerate(labels)}
    groups = []
    for arm, entry in data["arms"].items():
        bars = []
        for label in labels:
            run = entry["runs"][label]
            if run is None or run.get("failed") or run.get("score") is None:
                bars.append(Bar(label, None, color=color[label]))
                continue
            lo, hi = run.get("ci95") or (None, None)
            bars.append(Bar(label, 100 * run["score"], None if lo is None else 100 * lo,
                            None if hi is None else 100 * hi, color[label]))
        groups.append((arm, bars))
    diff_groups, extent = [], 5.0
    for arm, entry in data["arms"].items():
        bars = []
        for label in labels[1:]:
            d = (entry.get("differences") or {}).get(label)
            if d is None:
                bars.append(Bar(label, None, color=color[label]))
                continue
            bars.append(Bar(label, 100 * d["value"], 100 * d["ci95"][0], 100 * d["ci95"][1],
                            color[label]))
            extent = max(extent, abs(100 * d["ci95"][0]), abs(100 * d["ci95"][1]))
        diff_groups.append((arm, bars))
    extent = min(100.0, 5 * (int(extent / 5) + 1))
    headers, rows = table_rows(data)
    sections = [
        section("Arms of each run", interval_chart(groups),
                f"{data['metric']} in percent with each report's 95% interval"),
        section(f"Difference from {data['reference']}",
                interval_chart(diff_groups, -extent, extent, unit="", bars=False),
                "points, with paired-bootstrap 95% intervals (0 inside the interval: no "
                "difference shown by these rows)"),
        section("Table", table(headers, rows, ident="compare", numeric=range(1, len(headers)))),
        section("Method", f"<p>{data['method']}; {data['bootstrap']} resamples, seed "
                          f"{data['seed']}.</p>"),
    ]
    return page("copa compare", sections,
                f"{len(labels)} runs, {data['test_rows']} shared test rows")


def png(data: dict[str, Any]) -> bytes:
    """The same two charts as a PNG (matplotlib)."""
    plt = pyplot()

    labels = [r["label"] for r in data["runs"]]
    arms = list(data["arms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs, ys, err = [], [], [[], []]
        for j, arm in enumerate(arms):
            run = data["arms"][arm]["runs"][label]
            if run is None or run.get("score") is None:
                continue
            score = 100 * run["score"]
            lo, hi = run.get("ci95") or (run["score"], run["score"])
            xs.append(j + (i - (len(labels) - 1) / 2) * width)
            ys.append(score)
            err[0].append(max(0.0, score - 100 * lo))
            err[1].append(max(0.0, 100 * hi - score))
        left.bar(xs, ys, width=width * 0.9, yerr=err, capsize=3, label=label,
                 color=COLORS[i % len(COLORS)])
    left.set_xticks(range(len(arms)), arms, fontsize=8)
    left.set_ylim(0, 105)
    left.set_ylabel(f"{data['metric']} (%)")
    left.set_title("arms of each run (95% CI)", fontsize=10)
    left.legend(fontsize=8)
    for i, label in enumerate(labels[1:], start=1):
        xs, ys, err = [], [], [[], []]
        for j, arm in enumerate(arms):
            d = (data["arms"][arm].get("differences") or {}).get(label)
            if d is None:
                continue
            v = 100 * d["value"]
            xs.append(j + (i - len(labels) / 2) * 0.1)
            ys.append(v)
            err[0].append(max(0.0, v - 100 * d["ci95"][0]))
            err[1].append(max(0.0, 100 * d["ci95"][1] - v))
        right.errorbar(xs, ys, yerr=err, fmt="o", capsize=4, label=label,
                       color=COLORS[i % len(COLORS)])
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(range(len(arms)), arms, fontsize=8)
    right.set_ylabel("points")
    right.set_title(f"difference from {data['reference']} (paired, 95% CI)", fontsize=10)
    right.legend(fontsize=8)
    return png_bytes(fig)
