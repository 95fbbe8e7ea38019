"""finetune.eval and finetune.early_stopping: what the parent process and the training process
share (light: no torch here).

The train stage writes `val_eval.json` beside the training log: the val prompts (the rendered
val rows without their answers: the training format, one formatting path), the gold rows, the
metric and the stopping rule. The plugin's callback (copa.backends.axolotl_plugin) reads it in
the training process, scores val every N steps with the recipe's metric on greedy answers, and
keeps `val_curve.json` up to date: every evaluation (step, score, loss), the best step, and
whether training stopped early. The backend merges the best checkpoint it names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from copa.files import atomic_write_json
from copa.metrics import make_metric
from copa.prompting import parse_completion

SPEC_NAME = "val_eval.json"
CURVE_NAME = "val_curve.json"
VAL_EVAL_ENV = "COPA_VAL_EVAL"  # the spec's path, for the training process
LOG_KEY = "copa_val_score"  # how an evaluation is kept in the Trainer's log_history (resumes)


def prompt_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """A rendered training row (copa.prompting.training_row) without its answer: the prompt."""
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]


def eval_spec(recipe: Any, output_fields: Sequence[str], rendered_val: Sequence[Mapping],
              val_rows: Sequence[Mapping]) -> dict[str, Any]:
    """What the training process needs to score val: rendered_val are the rendered val rows
    (rendered/val.jsonl: the prompt format the model trains on, passages and demos included),
    val_rows the same rows as data (rendered/splits/val.jsonl: the gold answers)."""
    if len(rendered_val) != len(val_rows):
        raise ValueError(f"{len(rendered_val)} rendered val rows for {len(val_rows)} val rows")
    ft = recipe.finetune
    stopping = ft.early_stopping
    return {
        "metric": ft.eval.metric or recipe.evaluate.metric,
        # the recipe key a metric's bad value is reported under (copa.metrics.checked_metric)
        "metric_where": f"{recipe.source_path or '<recipe>'}: "
                        + ("finetune.eval.metric" if ft.eval.metric else "evaluate.metric"),
        "every": ft.eval.every,
        "patience": stopping.patience if stopping else None,
        "min_delta": stopping.min_delta if stopping else 0.0,
        "output_fields": list(output_fields),
        "answer_field": recipe.task.output_fields[-1],
        "choices": recipe.task.choices,
        "answers_field": "answers" if recipe.data.answers_column else None,
        "base_dir": str(recipe.base_dir),
        "max_tokens": recipe.evaluate.max_tokens,
        "prompts": [prompt_messages(row) for row in rendered_val],
        "examples": [dict(row) for row in val_rows],
    }


def write_spec(path: Path, spec: Mapping[str, Any]) -> Path:
    atomic_write_json(path, spec)
    return path


def read_spec(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


class Fields(dict):
    """An example or a prediction for a metric: dict access (copa's built-in metrics) and
    attribute access (a user metric written for dspy.Example / dspy.Prediction)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def score_answers(spec: Mapping[str, Any], answers: Sequence[str]) -> list[float]:
    """Each val row's metric value for the model's answers, parsed as the template adapter
    parses them (a field the answer lacks is empty, and scores as the metric says)."""
    metric = make_metric(spec["metric"], spec["answer_field"], spec.get("choices"),
                         Path(spec["base_dir"]), answers_field=spec.get("answers_field"),
                         where=spec.get("metric_where", "evaluate.metric"))
    fields = spec["output_fields"]
    scores = []
    for example, answer in zip(spec["examples"], answers, strict=True):
        parsed = parse_completion(answer, fields)
        prediction = Fields({name: parsed.get(name, "") for name in fields})
        scores.append(float(metric(Fields(example), prediction)))
    return scores


def plateau(evaluations: Sequence[Mapping[str, Any]], patience: int | None,
            min_delta: float = 0.0) -> dict[str, Any]:
    """The early-stopping rule over the evaluations so far: the best one (the first to reach
    its score: a later tie is no improvement, and the earlier checkpoint had fewer steps), how
    many evaluations since it, and whether to stop (patience evaluations without a gain of more
    than min_delta over the best)."""
    best: Mapping[str, Any] | None = None
    since = 0
    for record in evaluations:
        if best is None or record["score"] > best["score"] + min_delta:
            best, since = record, 0
        else:
            since += 1
    if best is None:
        return {"best_step": None, "best_score": None, "since_best": 0, "stop": False}
    return {"best_step": best["step"], "best_score": best["score"], "since_best": since,
            "stop": patience is not None and since >= patience}


def curve_path(work_dir: Path) -> Path:
    return Path(work_dir) / CURVE_NAME


def read_curve(work_dir: Path) -> dict[str, Any] | None:
    path = curve_path(work_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def curve_text(curve: Mapping[str, Any]) -> str:
    """One line for the report: every evaluation, the best marked, and how training ended."""
    best = curve.get("best_step")
    points = ", ".join(
        f"{e['step']}: {100 * e['score']:.1f}" + (" (best)" if e["step"] == best else "")
        for e in curve.get("evaluations", []))
    text = f"val {curve['metric']} by step ({curve['rows']} rows): {points or 'none'}"
    if curve.get("stopped_early"):
        text += (f"; stopped early at step {curve['ended_at']} of at most "
                 f"{curve['max_steps']} (no gain over the best for {curve['patience']} "
                 "evaluations)")
    elif curve.get("ended_at") is not None:
        text += f"; trained all {curve['ended_at']} steps"
    if curve.get("patience") is not None and best is not None:
        text += f"; merged checkpoint-{best}"
    return text
