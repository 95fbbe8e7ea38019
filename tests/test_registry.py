"""copa.registry: one table each for the built-in loaders, metrics and arms, and the pipeline's
stage record. What validates a recipe, what `--help` offers, what dispatches and what the
report calls an arm all come from the table: an entry added there is accepted, dispatched and
shown; one missing there is refused everywhere, with the table's names in the message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from copa.cli import cli
from copa.data.loaders import load_rows
from copa.metrics import make_metric
from copa.recipe import DataSection, EvaluateSection
from copa.registry import ARMS, LOADERS, METRICS, Loader, Metric


def first_word_rows(rows: list[dict[str, Any]], case: str = "keep") -> list[dict[str, Any]]:
    """A loader for the test's own table entry: each row's first word of 'text'."""
    words = [str(r["text"]).split()[0] for r in rows]
    return [{"text": w.upper() if case == "upper" else w} for w in words]


def longer_wins(gold: Any, pred: Any, choices: Any = None) -> float:
    """A metric for the test's own table entry."""
    return float(len(str(pred)) > len(str(gold)))


def _error(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return " ".join(str(e["msg"]) for e in exc.value.errors())


def test_a_metric_is_valid_and_dispatched_exactly_when_the_table_has_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in METRICS:  # every entry names a function that exists
        assert make_metric(name, "a").__name__ == name
        assert EvaluateSection(metric=name).metric == name
    monkeypatch.setitem(METRICS, "longer_wins", Metric(f"{__name__}:longer_wins"))
    assert EvaluateSection(metric="longer_wins").metric == "longer_wins"
    metric = make_metric("longer_wins", "a")
    assert metric({"a": "ab"}, {"a": "abc"}) == 1.0 and metric({"a": "ab"}, {"a": "a"}) == 0.0
    monkeypatch.delitem(METRICS, "token_f1")
    with pytest.raises(ValidationError) as exc:
        EvaluateSection(metric="token_f1")
    assert (f"unknown metric 'token_f1': use one of {', '.join(METRICS)} or a user function"
            in _error(exc))
    assert "longer_wins" in _error(exc)


def test_a_loader_is_valid_and_dispatched_exactly_when_the_table_has_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    description = DataSection.model_fields["loader"].description or ""
    options = DataSection.model_fields["loader_options"].description or ""
    for name, entry in LOADERS.items():  # the recipe's help text names every built-in
        assert f"'{name}' ({entry.help})" in description
        assert f"{name}: {entry.options_help};" in options
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "hello world"}\n{"text": "good night"}\n')
    monkeypatch.setitem(LOADERS, "first_word", Loader(
        f"{__name__}:first_word_rows", "each row's first word", {"case": ("keep", "upper")},
        "case (keep | upper)"))
    data = DataSection(source="rows.jsonl", loader="first_word", loader_options={"case": "upper"})
    assert load_rows(path, loader=data.loader, options=data.loader_options) == [
        {"text": "HELLO"}, {"text": "GOOD"}]
    with pytest.raises(ValidationError) as exc:
        DataSection(source="rows.jsonl", loader="first_word", loader_options={"case": "lower"})
    assert "loader_options.case: write one of keep, upper (got 'lower')" in _error(exc)
    monkeypatch.delitem(LOADERS, "gsm8k")
    with pytest.raises(ValidationError) as exc:
        DataSection(source="rows.jsonl", loader="gsm8k")
    assert ("unknown loader 'gsm8k': use squad or first_word, or a user function"
            in _error(exc))


def test_the_arms_table_drives_validation_help_and_the_report() -> None:
    from copa.stages import report as report_files
    from copa.stages.arms import ARM_MODELS
    from copa.stats import SINGLE_ARMS

    in_recipe = [name for name, arm in ARMS.items() if arm.in_recipe]
    assert EvaluateSection().arms == in_recipe  # the default: every arm a recipe may name
    for name in ARMS:
        if ARMS[name].in_recipe:
            assert EvaluateSection(arms=[name]).arms == [name]
        else:
            with pytest.raises(ValidationError):
                EvaluateSection(arms=[name])
    # --arm offers best and every arm of the table, in its order
    help_text = " ".join(CliRunner().invoke(cli, ["predict", "--help"]).output.split())
    assert "[default: best]" in help_text
    assert "best|" + "|".join(ARMS) in help_text.replace(" ", "")
    assert ARM_MODELS == {name: arm.model for name, arm in ARMS.items()}
    assert SINGLE_ARMS == tuple(n for n, a in ARMS.items() if a.single_lever)
    report = {"recipe": "r", "metric": "exact_match", "test_rows": 2,
              "arms": {name: {"score": 0.5, "ci95": [0.0, 1.0], "n": 2} for name in ARMS}}
    table = report_files.markdown(report).splitlines()
    for name, arm in ARMS.items():  # each arm's row says its model and prompt
        assert f"| {arm.short} | {arm.model} | {arm.prompt} | 50.0 |" in "\n".join(table), name


def test_the_stage_record_gives_the_cli_its_commands_and_force_choices() -> None:
    from copa.pipeline import RECORD, STAGES

    assert STAGES == tuple(stage.name for stage in RECORD)
    run_help = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    assert "[all|" + "|".join(STAGES) + "]" in run_help.replace(" ", "")
    for stage in RECORD:
        result = CliRunner().invoke(cli, [stage.name, "--help"])
        if stage.help:  # a stage with help has its command, with that help
            assert result.exit_code == 0
            assert " ".join(stage.help.split()) in " ".join(result.output.split())
        elif stage.name != "render":  # render's command is its own (an --output folder)
            assert result.exit_code != 0 and "No such command" in result.output


def test_a_stage_that_runs_again_makes_stale_exactly_the_stages_reading_it() -> None:
    """merge re-run: optimize (the combined arm's model) and evaluate; the demo-free fine-tune
    (plain_finetune) reads only render's rows, so re-merging never re-trains it."""
    from copa.pipeline import STAGES, dependents

    assert dependents("render") == list(STAGES[1:])
    assert dependents("train") == ["merge", "optimize", "evaluate"]
    assert dependents("merge") == ["optimize", "evaluate"]
    assert dependents("plain_finetune") == ["evaluate"]
    assert dependents("optimize") == ["evaluate"]
    assert dependents("evaluate") == []


def test_the_cli_reads_the_tables_without_loading_the_recipe_or_run_modules() -> None:
    """`copa --help` stays fast: the stage record and the tables load nothing of the recipe
    schema (pydantic), the data or the run directory."""
    import subprocess
    import sys

    code = ("import sys, copa.cli\n"
            "print(sorted(m for m in ('copa.runs', 'copa.recipe', 'copa.data', 'pydantic')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
