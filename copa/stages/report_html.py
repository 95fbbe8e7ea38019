"""report.html: one self-contained page per run (copa.htmlpage: inline CSS, JS and SVG, opens
offline) from report.json's data and the run directory's files: the arms with their intervals,
the training loss curve (train/progress.jsonl, written by copa's Axolotl plugin), every candidate
the prompt optimizer scored, the kept prompt exactly as the adapter sends it for one test row,
and the test predictions (sortable, filterable to the wrong answers).

`sent_prompts` is the one part that needs DSPy: the evaluate stage calls it with the programs it
evaluated and stores its result in report.json ("prompt_sent"), so this page shows what the
adapter produced, not a re-creation of it.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from copa.files import jsonl_lines
from copa.htmlpage import (
    Bar,
    data_table,
    interval_chart,
    line_chart,
    messages,
    page,
    section,
    table,
)
from copa.registry import ARMS
from copa.stages.predictions import read_predictions
from copa.text import one_line

ARM_COLORS = {name: arm.color for name, arm in ARMS.items()}


def sent_prompts(programs: dict[str, Any], adapter: Any, example: dict[str, Any]
                 ) -> dict[str, Any]:
    """Per arm, the chat messages its program's first predictor sends for `example` (a test
    row's inputs), produced by the adapter the arm is evaluated with (its format(): the same
    call DSPy makes before every request). An arm whose predictor takes inputs the row does
    not hold (a RAG program's passages) is left out, with the reason."""
    out: dict[str, Any] = {}
    for arm, program in programs.items():
        predictor = program.predictors()[0]
        fields = list(predictor.signature.input_fields)
        missing = [f for f in fields if f not in example]
        if missing:
            out[arm] = {"messages": None,
                        "why": f"its predictor's inputs {missing} are computed by the program"}
            continue
        try:
            chat = adapter.format(predictor.signature, predictor.demos,
                                  {f: example[f] for f in fields})
        except Exception as exc:  # a page's extra never fails the evaluate stage
            out[arm] = {"messages": None, "why": f"the adapter could not format it ({exc})"}
            continue
        out[arm] = {"messages": [{"role": m["role"], "content": str(m["content"])}
                                 for m in chat]}
    return out


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _arms_section(report: dict[str, Any]) -> str:
    groups, rows = [], []
    for arm, data in report["arms"].items():
        if data.get("failed"):
            groups.append((arm, [Bar(arm, None)]))
            rows.append([arm, ("failed", -1), "—", str(data["n"]), str(data.get("errors", 0))])
            continue
        lo, hi = data["ci95"]
        groups.append((arm, [Bar(arm, 100 * data["score"], 100 * lo, 100 * hi,
                                 ARM_COLORS.get(arm, "#90a4ae"))]))
        rows.append([arm, (_pct(data["score"]), data["score"]), f"[{_pct(lo)}, {_pct(hi)}]",
                     str(data["n"]), str(data.get("errors", 0))])
    effects = []
    for name in ("synergy", "finetune_gain"):
        entry = report.get(name)
        if not entry:
            continue
        if entry.get("value") is None:
            effects.append(f"<li><b>{name}</b>: not comparable: "
                           f"{escape(str(entry.get('reason', '')))}</li>")
            continue
        lo, hi = entry["ci95"]
        effects.append(f"<li><b>{name}</b> ({entry.get('definition', '')}): "
                       f"{100 * entry['value']:+.1f} points, 95% CI [{100 * lo:+.1f}, "
                       f"{100 * hi:+.1f}]</li>")
    val = report.get("val") or {}
    best = (f"<p>Best arm on val ({val.get('rows')} rows): <b>{escape(str(val['best_arm']))}</b> "
            "(what copa.load, copa serve and copa export use).</p>" if val.get("best_arm") else "")
    body = (interval_chart(groups) + table(["arm", "score", "95% CI", "n", "failed calls"],
                                           rows, ident="arms", numeric=(1, 2, 3, 4))
            + (f"<ul>{''.join(effects)}</ul>" if effects else "") + best)
    return section("Arms on the test split", body,
                   f"{report['metric']} in percent on {report['test_rows']} held-out test rows, "
                   "paired-bootstrap 95% intervals", anchor="arms")


def loss_points(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Training loss by step from train/progress.jsonl (and eval loss, where logged)."""
    path = Path(run_dir) / "train" / "progress.jsonl"
    series: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return series
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key, name in (("loss", "training loss"), ("eval_loss", "eval loss")):
            value = record.get(key)
            if isinstance(value, (int, float)):
                series.setdefault(name, []).append((float(record.get("step", 0)), float(value)))
    return series


def _loss_section(run_dir: Path) -> str:
    series = loss_points(run_dir)
    if not series:
        return section("Training loss", "<p class=\"note\">no training in this run (or no "
                       "train/progress.jsonl)</p>", anchor="loss")
    return section("Training loss", line_chart(series, "step", "loss"),
                   "as Axolotl's trainer logged it (train/progress.jsonl)", anchor="loss")


def _candidates_section(report: dict[str, Any]) -> str:
    parts = []
    for arm, info in (report.get("prompt_optimization") or {}).items():
        candidates = info.get("candidates") or []
        if info.get("strategy"):
            rows = [[c.get("strategy", ""), (_pct(c.get("val_score")), c.get("val_score") or -1),
                     str(c.get("demos", 0)), str(c.get("model", ""))] for c in candidates]
            headers = ["candidate", "val score", "demos", "model"]
        else:
            rows = [[c.get("source", ""), (_pct(c.get("val_score")), c.get("val_score") or -1),
                     str(c.get("demos", 0)),
                     " | ".join(one_line(i, 400) for i in c.get("instructions") or [])]
                    for c in candidates]
            headers = ["candidate", "val score", "demos", "instructions"]
        scores = ", ".join(f"{k} {_pct(v)}" for k, v in (info.get("val_scores") or {}).items())
        head = (f"<p><b>{escape(arm)}</b>: kept <b>{escape(str(info.get('winner')))}</b> "
                f"({info.get('demos', 0)} demos); val: {escape(scores) or 'not compared'}</p>")
        parts.append(head + (table(headers, rows, ident=f"candidates-{arm}", numeric=(1, 2))
                             if rows else "<p class=\"note\">the optimizer kept no record of "
                             "its candidates</p>"))
    return section("Prompt optimization: every candidate scored on val",
                   "".join(parts) or "<p class=\"note\">no prompt optimization in this run</p>",
                   anchor="candidates")


def _prompt_section(report: dict[str, Any]) -> str:
    sent = report.get("prompt_sent") or {}
    if not sent:
        return section("The prompt as sent", "<p class=\"note\">not recorded in this run's "
                       "report</p>", anchor="prompt")
    best = (report.get("val") or {}).get("best_arm")
    parts = []
    for arm, entry in sent.items():
        body = (messages(entry["messages"]) if entry.get("messages")
                else f"<p class=\"note\">not shown: {escape(str(entry.get('why', '')))}</p>")
        opened = " open" if arm == best or (best not in sent and not parts) else ""
        parts.append(f"<details{opened}><summary><b>{escape(arm)}</b>"
                     f"{' (best on val)' if arm == best else ''}</summary>{body}</details>")
    return section("The prompt as sent (first test row)", "".join(parts),
                   "each arm's kept program formatted by its adapter for one test row: the "
                   "messages the model receives, whitespace kept", anchor="prompt")


def prediction_rows(run_dir: Path, arms: list[str]) -> list[dict[str, Any]]:
    """One row per arm and test row, for the predictions table (`_wrong`: score below 1)."""
    rows = []
    for arm in arms:
        path = Path(run_dir) / "predictions" / f"{arm}.jsonl"
        if not path.is_file():
            continue
        for i, row in enumerate(read_predictions(path)):
            inputs = row["inputs"]
            score = float(row["score"])
            rows.append({"arm": arm, "row": i,
                         "input": one_line("; ".join(f"{k}: {v}" for k, v in inputs.items()),
                                           500),
                         "gold": one_line(str(row.get("gold")), 200),
                         "prediction": one_line(str(row.get("prediction")), 200)
                         + (" (failed call)" if row.get("error") else ""),
                         "score": round(score, 4), "_wrong": score < 1.0})
    return rows


PREDICTION_COLUMNS = [{"key": "arm", "label": "arm"}, {"key": "row", "label": "#", "num": True},
                      {"key": "input", "label": "input"}, {"key": "gold", "label": "gold"},
                      {"key": "prediction", "label": "prediction"},
                      {"key": "score", "label": "score", "num": True}]


def _predictions_section(run_dir: Path, report: dict[str, Any]) -> str:
    rows = prediction_rows(run_dir, list(report["arms"]))
    return section("Test predictions", data_table("predictions", PREDICTION_COLUMNS, rows),
                   "every arm's answer on every test row; click a header to sort; 'wrong' = "
                   "a score below 1", anchor="predictions")


def html(report: dict[str, Any], run_dir: Path) -> str:
    """report.html's text."""
    settings = report.get("settings") or {}
    about = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    versions = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in (report.get("stage_seconds") or {}).items())
    sections = [_arms_section(report), _loss_section(run_dir), _candidates_section(report),
                _prompt_section(report), _predictions_section(run_dir, report),
                section("Run", f"<p>Settings: {escape(about) or '—'}</p><p>Stage wall time: "
                        f"{stages or '—'}</p><p>Versions: {escape(versions) or '—'}</p>")]
    return page(f"copa report: {report['recipe']}", sections,
                f"metric {report['metric']}, {report['test_rows']} test rows")
