"""The prompt optimizers a recipe names get what they need from copa: a writer LM with its own
token budget (MIPROv2's proposer, GEPA's reflection), and for GEPA a metric with feedback."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from conftest import write_prompt_only_recipe, write_tiny_recipe

from copa.dspy.search import build_optimizer, feedback_metric
from copa.recipe import load_recipe


@pytest.fixture()
def recipe_for(tmp_path: Path, tiny_model_dir: Path):
    def make(optimizer: str, params: str) -> object:
        path = write_tiny_recipe(tmp_path, tiny_model_dir)
        text = path.read_text()
        text = text.replace("  optimizer: BootstrapFewShotWithRandomSearch\n",
                            f"  optimizer: {optimizer}\n  max_tokens: 300\n")
        text = text.replace(
            "  params: {max_bootstrapped_demos: 1, max_labeled_demos: 2, "
            "num_candidate_programs: 1}\n", f"  params: {params}\n")
        path.write_text(text)
        return load_recipe(path)

    return make


def _metric(example, prediction, trace=None) -> float:
    return float(example.species == prediction.species)


def test_mipro_proposes_with_the_task_lm_at_the_optimizers_token_budget(recipe_for) -> None:
    recipe = recipe_for("MIPROv2", "{auto: light}")
    task_lm = dspy.LM("openai/never-called", max_tokens=4)
    optimizer = build_optimizer(recipe, _metric, task_lm)
    assert optimizer.prompt_model.kwargs["max_tokens"] == 300
    assert optimizer.prompt_model.model == task_lm.model
    assert task_lm.kwargs["max_tokens"] == 4  # the task's own LM keeps the answer length


def test_params_go_to_the_constructor_or_to_compile_where_each_belongs(recipe_for) -> None:
    """MIPROv2 takes num_trials and the proposer switches in compile(), not in its
    constructor: a recipe names them all in optimize.params and copa routes each."""
    from copa.dspy.search import OptimizeError, compile_params

    recipe = recipe_for("MIPROv2", "{auto: null, num_candidates: 3, num_trials: 2, "
                                   "data_aware_proposer: false, minibatch: false}")
    optimizer = build_optimizer(recipe, _metric, dspy.LM("openai/never-called"))
    assert optimizer.num_candidates == 3
    assert compile_params(type(optimizer), dict(recipe.optimize.params)) == {
        "num_trials": 2, "data_aware_proposer": False, "minibatch": False}
    typo = recipe_for("MIPROv2", "{auto: light, num_trails: 2}")
    with pytest.raises(OptimizeError, match=r"takes none of \['num_trails'\].*num_trials"):
        build_optimizer(typo, _metric, dspy.LM("openai/never-called"))


def test_gepa_from_a_recipe_gets_a_reflection_lm_and_a_five_argument_metric(recipe_for) -> None:
    recipe = recipe_for("GEPA", "{auto: light}")
    optimizer = build_optimizer(recipe, _metric, dspy.LM("openai/never-called", max_tokens=4))
    assert optimizer.reflection_lm.kwargs["max_tokens"] == 300
    from copa.dspy.adapter import WriterAdapter  # reflections parse as a small model writes them

    assert isinstance(optimizer.custom_instruction_proposer.adapter, WriterAdapter)
    gold = dspy.Example(species="setosa")
    wrong = optimizer.metric_fn(gold, dspy.Prediction(species="virginica"), None, "predict", None)
    right = optimizer.metric_fn(gold, dspy.Prediction(species="setosa"), None, "predict", None)
    assert (wrong.score, right.score) == (0.0, 1.0)
    assert wrong.feedback == "expected 'setosa', got 'virginica'"


def test_a_user_metric_with_its_own_feedback_passes_through() -> None:
    def mine(gold, pred, trace=None):
        return dspy.Prediction(score=0.5, feedback="half right")

    result = feedback_metric(mine, "species")(dspy.Example(species="a"), dspy.Prediction())
    assert (result.score, result.feedback) == (0.5, "half right")


def test_a_teacher_and_a_proposer_reach_the_optimizer(recipe_for) -> None:
    recipe = recipe_for("BootstrapFewShot", "{max_bootstrapped_demos: 1}")
    task_lm, teacher = dspy.LM("openai/task", max_tokens=4), dspy.LM("openai/teacher")
    optimizer = build_optimizer(recipe, _metric, task_lm, teacher=teacher)
    assert optimizer.teacher_settings == {"lm": teacher}
    mipro = build_optimizer(recipe_for("MIPROv2", "{auto: light}"), _metric, task_lm,
                            proposer=dspy.LM("openai/proposer", max_tokens=300))
    assert mipro.prompt_model.model == "openai/proposer"
    assert mipro.task_model is task_lm


@pytest.mark.parametrize("role, value, says", [
    ("proposer", "./no-such-model", "optimize.proposer"),
    ("teacher", "merged", "optimize.teacher: 'merged' exists only after fine-tuning"),
])
def test_validate_rejects_a_role_model_that_cannot_exist(tmp_path: Path, tiny_model_dir: Path,
                                                         role: str, value: str,
                                                         says: str) -> None:
    from click.testing import CliRunner

    from copa.cli import cli

    path = write_tiny_recipe(tmp_path, tiny_model_dir)
    text = path.read_text().replace("  num_threads: 4\nevaluate",
                                    f"  num_threads: 4\n  {role}: {value}\nevaluate", 1)
    if value == "merged":
        text = text.replace("finetune:\n", "finetune:\n  enabled: false\n", 1)
    path.write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert says in result.output


@pytest.mark.slow
def test_gepa_runs_from_a_recipe_with_a_reflection_model(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    """`optimizer: GEPA` from a recipe, its reflection model named as `proposer`: the prompt
    stage compiles end to end (the tiny random model's reflections do not parse, so GEPA keeps
    the seed instruction, which is GEPA's own behaviour, and copa keeps plain on val)."""
    from copa import pipeline

    path = write_prompt_only_recipe(tmp_path, tiny_model_dir,
        "  optimizer: GEPA\n  params: {max_metric_calls: 20}\n  proposer: base\n"
        "  max_tokens: 32\n")
    run = pipeline.run(path, stages=["optimize"], run_dir=tmp_path / "run", emit=lambda _: None)
    log = (run.optimize_dir / "dspy-prompt_only.log").read_text()
    assert "Iteration 1: Selected program" in log  # GEPA's loop ran, reflecting
    summary = json.loads((run.optimize_dir / "optimize.json").read_text())
    assert set(summary["prompt_only"]["val_scores"]) == {"plain", "optimized"}


def test_a_small_proposers_answer_is_kept_as_its_whole_sentences() -> None:
    """A 135M proposer often writes no `[[ ## ... ## ]]` markers, or is cut off by max_tokens
    mid-sentence: ChatAdapter would fail MIPROv2's whole run on it (seen on Iris). The writer
    adapter takes a one-field text answer as the text and keeps its whole sentences."""
    from dspy.utils.exceptions import AdapterParseError

    from copa.dspy.adapter import WriterAdapter

    writer = WriterAdapter()
    proposal = dspy.Signature("basic_instruction -> proposed_instruction")
    assert writer.parse(proposal, "Classify the message into its intent. Answer with the") == {
        "proposed_instruction": "Classify the message into its intent."}
    marked = "[[ ## proposed_instruction ## ]]\nName the species.\n\n[[ ## completed ## ]]"
    assert writer.parse(proposal, marked) == {"proposed_instruction": "Name the species."}
    assert writer.parse(proposal, "no sentence ends") == {
        "proposed_instruction": "no sentence ends"}
    with pytest.raises(AdapterParseError):  # two fields: no guessing which text is which
        writer.parse(dspy.Signature("question -> reasoning, answer"), "Some text.")


@pytest.mark.slow
def test_mipro_proposes_distinct_instructions_by_sampling(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    """MIPROv2 from a recipe, proposer = the base model on copa's engine: each proposal is a
    sampled rollout (MIPROv2 asks for temperature 1.0 and a fresh rollout id), so the instruction
    candidates differ. With the greedy-only engine of before they came out the same; with
    ChatAdapter's strict parse the tiny model's unmarked answers failed the run. No tips, no
    program or data summaries: every proposal gets the same prompt, so only sampling differs."""
    import re

    from copa import pipeline

    path = write_prompt_only_recipe(tmp_path, tiny_model_dir,
        "  optimizer: MIPROv2\n  params: {auto: null, num_candidates: 4, num_trials: 2, "
        "max_bootstrapped_demos: 0, max_labeled_demos: 0, data_aware_proposer: false, "
        "tip_aware_proposer: false, program_aware_proposer: false, "
        "minibatch: false}\n"
        "  proposer: base\n  max_tokens: 24\n")
    run = pipeline.run(path, stages=["optimize"], run_dir=tmp_path / "run", emit=lambda _: None)
    log = (run.optimize_dir / "dspy-prompt_only.log").read_text()
    block = log.split("Proposed Instructions for Predictor 0:", 1)[1].split("==>", 1)[0]
    proposals = {m.group(1).strip() for m in re.finditer(r"^[1-9]\d*: (.+)$", block, re.M)}
    assert len(proposals) >= 3, block  # candidate 0 is the recipe's own instruction
    summary = json.loads((run.optimize_dir / "optimize.json").read_text())
    assert summary["prompt_only"]["candidates"]  # the trials MIPROv2 scored on val


def _iris_examples(n: int, **change: object) -> list[dspy.Example]:
    species = ["setosa", "versicolor", "virginica"]
    return [dspy.Example(**{"sepal_length": 5.0 + i / 10, "sepal_width": 3.1,
                            "petal_length": 1.4, "petal_width": 0.2, "species": species[i % 3],
                            **change}).with_inputs(
        "sepal_length", "sepal_width", "petal_length", "petal_width") for i in range(n)]


@pytest.mark.parametrize("trainset, valset, error, message", [
    ("setosa", None, TypeError, "trainset must be a list of dspy.Example (got str)"),
    ({"species": "setosa"}, None, TypeError, "trainset must be a list of dspy.Example (got "
                                             "dict)"),
    ([1, 2], None, TypeError, "trainset example 1 must be a dspy.Example (got int)"),
    ([], _iris_examples(3), ValueError, "trainset is empty"),
    (_iris_examples(6, species=None), None, ValueError,
     "trainset: row 1 has null for 'species' (and 5 more"),
    (_iris_examples(6, sepal_width=[3.1]), None, ValueError,
     "trainset: row 1 has a list for 'sepal_width', where one text or number belongs"),
    (_iris_examples(6, species=" "), None, ValueError, "trainset: row 1 has an empty gold"),
    (_iris_examples(6, species="rose"), None, ValueError,
     "1 label value(s) in trainset are not among the choices: 'rose'"),
    (_iris_examples(6), _iris_examples(2), ValueError,
     "valset example 1 (and 1 more) has the inputs of a trainset example"),
], ids=["str", "dict", "ints", "empty", "null-label", "list-input", "blank-label",
        "label-not-a-choice", "val-in-train"])
def test_copa_optimizer_names_examples_it_cannot_train_on(
        tmp_path: Path, tiny_model_dir: Path, trainset: object, valset: object, error: type,
        message: str) -> None:
    """compile's examples are checked as data.source's rows are, before anything trains:
    a None or a list reached the training rows as 'None' or the list's repr, a label outside
    task.choices was trained on; an empty trainset failed deep in rendering."""
    import re

    from copa import COPAOptimizer
    from copa.dspy.program import make_program

    recipe = write_tiny_recipe(tmp_path, tiny_model_dir)
    optimizer = COPAOptimizer(recipe, run_dir=tmp_path / "run", emit=lambda _: None)
    with pytest.raises(error, match=re.escape(message)):
        optimizer.compile(make_program(load_recipe(recipe)), trainset=trainset, valset=valset)
    assert not (tmp_path / "run" / "rendered").exists()  # nothing rendered or trained


def test_copa_optimizer_refuses_arguments_of_the_wrong_kind(tmp_path: Path) -> None:
    from copa import COPAOptimizer

    with pytest.raises(TypeError, match="metric must be a function metric"):
        COPAOptimizer(tmp_path / "r.yaml", metric="label_accuracy")
    with pytest.raises(TypeError, match="emit must be a function"):
        COPAOptimizer(tmp_path / "r.yaml", emit="log.txt")
