"""Issue 12.4: a failed LM call is counted, never a silent zero. Real DSPy programs on copa's real
batching engine whose model raises for some prompts, and a real server LM pointed at a closed
port; no DSPy part is mocked."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
import yaml
from conftest import engine_lm, label_exact, label_examples

from copa.dspy.scoring import ScoreError, evaluate_program
from copa.dspy.search import OptimizeError, prompt_optimize
from copa.inference.local import Generation
from copa.metrics import MetricValueError
from copa.recipe.schema import Recipe


class FailingModel:
    """Stands in for LocalModel behind the real BatchingEngine: answers in ChatAdapter's format
    with the label the prompt names, raises for prompts that contain 'boom', and answers
    unparseable prose for prompts that contain 'prose'."""

    path = "failing"

    def generate_detailed(self, prompts, max_new_tokens, stop, sampling=None) -> list[Generation]:
        out = []
        for chat in prompts:
            text = chat[-1]["content"]
            if "boom" in text:
                raise RuntimeError("engine down")
            answer = ("I would rather not say." if "prose" in text else
                      f"[[ ## label ## ]]\n{'pos' if 'good' in text else 'neg'}\n\n"
                      "[[ ## completed ## ]]")
            out.append(Generation(answer, 1, 1, "stop"))
        return out


@pytest.fixture
def lm() -> Iterator[dspy.LM]:
    with engine_lm(FailingModel(), "failing", max_batch_size=1) as failing:
        yield failing


def scored_with(lm: dspy.LM, texts: list[str], max_errors: int | None = None):
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        return evaluate_program(dspy.Predict("text -> label"), label_examples(texts),
                                label_exact, 2, max_errors)


def test_failed_calls_are_counted_per_row(lm: dspy.LM) -> None:
    texts = ["good 1", "bad 2", "boom good 3", "good 4", "boom bad 5", "bad 6"]
    scored = scored_with(lm, texts)
    assert scored.errors == 2
    assert scored.failed == ["boom" in t for t in texts]
    assert [s for _, _, s in scored.results] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert scored.mean == pytest.approx(4 / 6)
    assert "engine down" in scored.first_error
    assert not scored.all_failed


def test_every_call_failing_is_marked_all_failed(lm: dspy.LM) -> None:
    scored = scored_with(lm, ["boom 1", "boom 2", "boom 3"])
    assert scored.errors == 3 and scored.all_failed


def test_past_the_budget_scoring_stops_with_the_first_error(lm: dspy.LM) -> None:
    texts = ["good 1", "boom 2", "boom 3", "bad 4"]
    assert scored_with(lm, texts, max_errors=2).errors == 2
    with pytest.raises(ScoreError, match="over evaluate.max_errors=1 .first: .*engine down"):
        scored_with(lm, texts, max_errors=1)


def test_an_unparseable_answer_is_a_wrong_answer_not_a_failed_call(lm: dspy.LM) -> None:
    scored = scored_with(lm, ["prose good 1", "good 2"], max_errors=0)
    assert scored.errors == 0
    assert [s for _, _, s in scored.results] == [0.0, 1.0]


class SilentModel:
    """Answers a chat's label as copa's template expects it (the bare label), and nothing at
    all (an immediate end of turn) where the message says 'silent'."""

    path = "silent"

    def generate_detailed(self, prompts, max_new_tokens, stop, sampling=None) -> list[Generation]:
        texts = [chat[-1]["content"] for chat in prompts]
        return [Generation("" if "silent" in t else "pos" if "good" in t else "neg", 1, 1, "stop")
                for t in texts]


def test_an_empty_answer_is_a_wrong_answer_in_dspys_own_evaluation_too() -> None:
    """An optimizer scores candidates with DSPy's Evaluate, where an exception counts toward
    max_errors and cancels the search (seen: a Gemma fine-tune shown demos ended its turn at
    once and BootstrapFewShotWithRandomSearch stopped the prompt stage). copa's template
    adapter makes an empty completion an empty answer, scored 0 like any wrong one."""
    from copa.dspy.adapter import TemplateAdapter
    from copa.prompting import find_template, load_spec

    spec = load_spec(find_template("prompts/question.jinja"), "Say the label.", ("text",),
                     ("label",), ("pos", "neg"))
    devset = label_examples(["silent good 1", "good 2", "silent bad 3", "bad 4", "good 5"])
    with engine_lm(SilentModel(), "silent") as silent, \
            dspy.context(lm=silent, adapter=TemplateAdapter(spec)):
        result = dspy.Evaluate(devset=devset, metric=label_exact, num_threads=2, max_errors=1,
                               display_progress=False)(dspy.Predict("text -> label"))
    assert [s for _, _, s in result.results] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert [p.label for _, p, _ in result.results] == ["", "pos", "", "neg", "pos"]


def _recipe(**evaluate) -> Recipe:
    return Recipe.model_validate({
        "name": "errors", "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
        "data": {"source": "data.jsonl"},
        "optimize": {"optimizer": "BootstrapFewShot",
                     "params": {"max_bootstrapped_demos": 1, "max_labeled_demos": 1},
                     "num_threads": 2},
        "evaluate": {"metric": "label_accuracy", **evaluate}})


def _optimize(lm: dspy.LM, recipe: Recipe, emit: Callable[[str], None]):
    train = label_examples(["boom good 1", "good 2", "bad 3"])
    val = label_examples(["good 4", "boom bad 5", "bad 6"])
    return prompt_optimize(recipe, dspy.Predict("text -> label"), lm, dspy.ChatAdapter(), train,
                           val, label_exact, emit=emit)


def test_the_prompt_stage_counts_failed_calls_and_says_so(lm: dspy.LM) -> None:
    messages: list[str] = []
    result = _optimize(lm, _recipe(max_errors=1), messages.append)
    summary = result.summary()
    assert summary["val_errors"] == {"plain": 1, "optimized": 1}
    assert summary["lm_errors"] >= 1  # the bootstrap's call on 'boom good 1'
    assert any("failed calls on val" in m and "plain 1" in m for m in messages)
    assert any("LM calls failed while the optimizer ran" in m for m in messages)


def test_the_prompt_stage_fails_past_the_budget(lm: dspy.LM) -> None:
    with pytest.raises(OptimizeError, match="candidate 'plain' on val: .*engine down"):
        _optimize(lm, _recipe(), lambda _: None)


# --- the evaluate stage, against a server that is not there ------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the block ends: connections are refused


def _server_recipe(folder: Path, model: Path, max_errors: int) -> Path:
    (folder / "data.jsonl").write_text("".join(
        json.dumps({"text": f"row {i}", "label": "pos" if i % 2 else "neg"}) + "\n"
        for i in range(30)))
    recipe = {
        "name": "down", "model": {"base": str(model)},
        "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
        "data": {"source": "data.jsonl", "splits": {"train": 6, "val": 4, "test": 3}},
        "finetune": {"enabled": False, "max_steps": 1},
        "optimize": {"enabled": False},
        "evaluate": {"metric": "label_accuracy", "arms": ["baseline", "prompt_only"],
                     "max_errors": max_errors, "bootstrap": 50, "num_threads": 3},
        "serve": {"engine": "openai", "api_base": f"http://127.0.0.1:{_closed_port()}/v1",
                  "model": "nobody-home"}}
    path = folder / "down.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_evaluate_fails_clearly_past_max_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    from copa import pipeline
    from copa.stages.evaluate import EvaluateError

    recipe = _server_recipe(tmp_path, tiny_model_dir, max_errors=0)
    with pytest.raises(EvaluateError, match=r"evaluate: arm 'baseline': .*over "
                                            r"evaluate.max_errors=0"):
        pipeline.run(recipe, run_dir=tmp_path / "run", emit=lambda _: None)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["evaluate"]["status"] == "failed"
    assert not (tmp_path / "run" / "report.json").exists()


def test_an_arm_whose_every_call_failed_is_marked_failed_not_zero(tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    from copa import pipeline

    recipe = _server_recipe(tmp_path, tiny_model_dir, max_errors=100)
    messages: list[str] = []
    run = pipeline.run(recipe, run_dir=tmp_path / "run", emit=messages.append)
    report = json.loads((run.dir / "report.json").read_text())
    for arm in ("baseline", "prompt_only"):
        data = report["arms"][arm]
        assert data["failed"] is True and data["errors"] == 3 and data["score"] is None
        assert any(m.strip().startswith(arm) and "FAILED" in m for m in messages)
    markdown = (run.dir / "report.md").read_text()
    assert "| baseline | base (" in markdown and "| plain | **failed** | — | 3 | 3 |" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and not any("| 0.0 |" in line for line in table), table
    assert not (run.dir / "predictions" / "baseline.key").exists()  # a re-run retries


def test_the_report_shows_failed_calls_within_the_budget() -> None:
    from copa.stages.report import markdown

    report = {"recipe": "r", "metric": "exact_match", "test_rows": 9, "arms": {
        "baseline": {"score": 0.5, "ci95": [0.2, 0.8], "n": 9, "errors": 0},
        "prompt_only": {"score": 0.3, "ci95": [0.1, 0.6], "n": 9, "errors": 2}},
        "prompt_optimization": {"prompt_only": {"winner": "plain", "val_scores": {"plain": 0.5},
                                                "val_errors": {"plain": 1}, "lm_errors": 3}}}
    text = markdown(report)
    assert "| prompt-only | base | DSPy | 30.0 | [10.0, 60.0] | 9 | 2 |" in text
    assert "- prompt_only: 2 of 9 calls failed and score 0" in text
    assert "failed calls: 3 while optimizing; on val plain 1" in text


# --- a metric that returns no number: its own error, never failed calls ------------------------

def _nan_for_bad(example: Any, prediction: Any, trace: Any = None) -> float:
    return float("nan") if example.label == "neg" else label_exact(example, prediction)


@pytest.mark.parametrize("max_errors", [None, 5])
def test_a_metric_returning_nan_is_said_as_such_not_as_failed_calls(
        lm: dspy.LM, max_errors: int | None) -> None:
    """No LM call failed: the metric's NaN is neither 'N calls failed (first: unknown)' nor,
    within max_errors, a silent 0 for those rows."""
    with pytest.raises(MetricValueError, match=r"metric '_nan_for_bad' returned nan"):
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            evaluate_program(dspy.Predict("text -> label"),
                             label_examples(["good 1", "bad 2", "bad 3"]), _nan_for_bad, 2,
                             max_errors)


@pytest.mark.parametrize("n, value, shown", [(0, "float('nan')", "nan (float)"),
                                             (1, "float('-inf')", "-inf (float)"),
                                             (2, "None", "None (NoneType)"),
                                             (3, "'1.0'", "'1.0' (str)")])
def test_a_user_metric_returning_no_number_names_the_recipe_key_the_row_and_the_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, value: str, shown: str) -> None:
    from copa.metrics import make_metric

    module = f"case_nan_metrics_{n}"  # one module name per case: imports are cached
    (tmp_path / f"{module}.py").write_text(
        f"def score(example, prediction, trace=None):\n    return {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = make_metric(f"{module}:score", "label", base_dir=tmp_path,
                         where="r.yaml: evaluate.metric")
    with pytest.raises(MetricValueError) as caught:
        metric(dspy.Example(label="neg"), dspy.Prediction(label="pos"))
    assert str(caught.value).startswith(
        f"r.yaml: evaluate.metric: '{module}:score' on a row (gold 'neg', answer "
        f"'pos') returned {shown}: a metric must return a finite number")
    assert metric.problem is caught.value


def test_a_metric_returning_a_number_or_a_feedback_prediction_passes_unchanged() -> None:
    from copa.metrics import checked_metric

    for result in (0.5, True, 1, dspy.Prediction(score=1.0, feedback="correct")):
        assert checked_metric(lambda e, p, t=None, r=result: r, "m", "label")({}, {}) is result


def test_the_prompt_stage_says_a_metric_returned_nan_while_the_optimizer_ran(
        lm: dspy.LM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BootstrapFewShot calls the metric with a trace and counts its exception as a failed
    row; with guard off nothing else scores: the stage still says what the metric did."""
    from copa.metrics import make_metric

    (tmp_path / "case_trace_metrics.py").write_text(
        "def score(example, prediction, trace=None):\n"
        "    return float('nan') if trace is not None else 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe()
    recipe.optimize.guard = False
    metric = make_metric("case_trace_metrics:score", "label", base_dir=tmp_path)
    with pytest.raises(MetricValueError, match="evaluate.metric: 'case_trace_metrics:score' "
                                               "on a row .* returned nan"):
        prompt_optimize(recipe, dspy.Predict("text -> label"), lm, dspy.ChatAdapter(),
                        label_examples(["good 1", "good 2", "bad 3"]),
                        label_examples(["good 4", "bad 5"]), metric, emit=lambda _: None)


def test_copa_run_with_a_metric_returning_nan_is_one_line_naming_evaluate_metric_exit_2(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"text": f"row {i}", "label": "pos" if i % 2 else "neg"}) + "\n"
        for i in range(12)))
    (tmp_path / "case_run_nan.py").write_text(
        "def score(example, prediction, trace=None):\n    return float('nan')\n")
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "nan", "model": {"base": str(tiny_model_dir)},
        "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
        "data": {"source": "data.jsonl", "splits": {"train": 6, "val": 2, "test": 3}},
        "finetune": {"enabled": False}, "optimize": {"enabled": False},
        "evaluate": {"metric": "case_run_nan:score", "arms": ["baseline"], "max_errors": 10,
                     "max_tokens": 4, "bootstrap": 50}}, sort_keys=False))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2, result.output
    assert last.startswith(f"{recipe}: evaluate.metric: 'case_run_nan:score' on a row"), last
    assert "returned nan (float)" in last and "calls failed" not in result.output
