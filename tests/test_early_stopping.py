"""finetune.eval and finetune.early_stopping: val scored with the recipe's metric inside the
training process, training stopped on a plateau, the best checkpoint (not the last) merged.

The slow test trains the tiny model once through real Axolotl; its recipe's metric is a user
function (next to the recipe) that scores each evaluation from a script (0.2, 0.5, 0.5, 0.4, ...),
so the curve plateaus at a known step whatever the random model answers, and records every
example and answer it was given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_tiny_recipe

from copa.backends.valcurve import plateau, score_answers
from copa.data import read_jsonl
from copa.recipe import RecipeError, load_recipe

SCRIPTED_METRIC = '''\
import json, os

SCORES = json.loads(os.environ.get("SCRIPTED_SCORES", "[0.2, 0.5, 0.5, 0.4, 0.3]"))
ROWS = 6  # the tiny recipe's val rows: one evaluation is ROWS calls
calls = 0


def score(example, prediction, trace=None):
    global calls
    evaluation = calls // ROWS
    calls += 1
    with open(os.environ["SCRIPTED_METRIC_LOG"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "example": dict(example),
                              "species": prediction.species}) + "\\n")
    return SCORES[min(evaluation, len(SCORES) - 1)]
'''

EVAL = "  eval: {every: 2}\n  early_stopping: {patience: 2}\n"


def scripted_recipe(folder: Path, tiny_model_dir: Path, max_steps: int, finetune: str) -> Path:
    """The tiny recipe whose metric is SCRIPTED_METRIC; `finetune` replaces its 'finetune:'
    line (the section's first lines)."""
    path = write_tiny_recipe(folder, tiny_model_dir, max_steps=max_steps)
    (folder / "scripted_metric.py").write_text(SCRIPTED_METRIC)
    text = path.read_text().replace("metric: label_accuracy", "metric: scripted_metric:score")
    path.write_text(text.replace("finetune:\n", finetune, 1))
    return path


# ---- fast: the recipe keys, the stopping rule, the scoring ------------------------------------

def test_early_stopping_needs_eval_and_eval_checks_its_metric(tmp_path: Path) -> None:
    path = write_tiny_recipe(tmp_path, tmp_path / "model")  # only loaded, never trained
    text = path.read_text()
    path.write_text(text.replace("finetune:\n", "finetune:\n  early_stopping: {patience: 2}\n"))
    with pytest.raises(RecipeError, match="add 'eval: {every: N}'"):
        load_recipe(path)
    path.write_text(text.replace("finetune:\n", "finetune:\n  eval: {every: 0}\n"))
    with pytest.raises(RecipeError, match="finetune.eval.every"):
        load_recipe(path)
    path.write_text(text.replace("finetune:\n", "finetune:\n  eval: {every: 2, metric: acc}\n"))
    with pytest.raises(RecipeError, match="unknown metric 'acc'"):
        load_recipe(path)
    path.write_text(text.replace("finetune:\n", "finetune:\n  eval: {every: 2}\n  distributed: "
                                 "{processes: 2, backend: fsdp}\n"))
    with pytest.raises(RecipeError, match="not with fsdp"):
        load_recipe(path)


def test_plateau_keeps_the_first_best_and_stops_after_patience_evaluations() -> None:
    curve = [{"step": s, "score": v} for s, v in [(2, 0.2), (4, 0.5), (6, 0.5), (8, 0.4)]]
    assert plateau(curve[:3], patience=2) == {"best_step": 4, "best_score": 0.5,
                                              "since_best": 1, "stop": False}
    assert plateau(curve, patience=2)["stop"] is True
    assert plateau(curve, patience=3)["stop"] is False
    assert plateau(curve, patience=None)["stop"] is False  # eval alone never stops
    # A gain within min_delta is no improvement: the best stays at step 2.
    assert plateau(curve, patience=2, min_delta=0.3) == {"best_step": 2, "best_score": 0.2,
                                                         "since_best": 3, "stop": True}


def test_answers_are_parsed_and_scored_with_the_recipes_metric() -> None:
    """As the template adapter parses a chain-of-thought answer: the answer field's line."""
    spec = {"metric": "label_accuracy", "answer_field": "species",
            "output_fields": ["reasoning", "species"], "choices": ["setosa", "virginica"],
            "base_dir": ".", "answers_field": None,
            "examples": [{"species": "setosa"}, {"species": "virginica"}, {"species": "setosa"}]}
    answers = ["reasoning: small petals\nspecies: Setosa.", "species: the virginica",
               "reasoning: setosa is small\nspecies: virginica"]
    assert score_answers(spec, answers) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("own_metric", [True, False])
def test_a_val_metric_returning_nan_is_an_error_naming_its_recipe_key(
        tmp_path: Path, own_metric: bool) -> None:
    """finetune.eval scores val inside training: a NaN there would be a NaN val curve and a
    plateau decided on it. It names finetune.eval.metric, or evaluate.metric where that is the
    metric finetune.eval uses."""
    from copa.backends.valcurve import eval_spec
    from copa.metrics import MetricValueError

    path = write_tiny_recipe(tmp_path, tmp_path / "model")  # only loaded, never trained
    module = f"case_val_nan_{int(own_metric)}"  # one module name per case: imports are cached
    (tmp_path / f"{module}.py").write_text(
        "def score(example, prediction, trace=None):\n    return float('nan')\n")
    text = path.read_text()
    if own_metric:
        text = text.replace("finetune:\n", f"finetune:\n  eval: {{every: 2, metric: "
                                           f"'{module}:score'}}\n", 1)
    else:
        text = text.replace("metric: label_accuracy", f"metric: {module}:score")
        text = text.replace("finetune:\n", "finetune:\n  eval: {every: 2}\n", 1)
    path.write_text(text)
    recipe = load_recipe(path)
    rendered = [{"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "setosa"}]}]
    spec = eval_spec(recipe, ["species"], rendered, [{"species": "setosa"}])
    key = "finetune.eval.metric" if own_metric else "evaluate.metric"
    with pytest.raises(MetricValueError) as caught:
        score_answers(spec, ["setosa"])
    assert str(caught.value).startswith(f"{path}: {key}: '{module}:score' on a row (gold "
                                        "'setosa', answer 'setosa') returned nan")


# ---- slow: one real training on the tiny model ------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from copa import pipeline

    folder = tmp_path_factory.mktemp("early-stop")
    recipe = scripted_recipe(folder, tiny_model_dir, max_steps=12, finetune="finetune:\n" + EVAL)
    metric_log = folder / "metric.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRIPTED_METRIC_LOG", str(metric_log))
    mp.delenv("SCRIPTED_SCORES", raising=False)
    messages: list[str] = []
    try:
        run = pipeline.run(recipe, stages=["render"], run_dir=folder / "run",
                           emit=messages.append)
        # Training never reads the test split: it is not even there while training runs.
        test_split = run.rendered / "splits" / "test.jsonl"
        shutil.move(test_split, folder / "test.jsonl.away")
        try:
            run = pipeline.run(recipe, stages=["merge"], run_dir=folder / "run",
                               emit=messages.append)
        finally:
            shutil.move(folder / "test.jsonl.away", test_split)
    finally:
        mp.undo()
    return run, messages, read_jsonl(metric_log)


@pytest.mark.slow
def test_val_is_scored_at_the_set_steps_and_training_stops_on_the_plateau(stopped_run) -> None:
    run, messages, metric_calls = stopped_run
    events = [json.loads(line) for line in
              (run.train_dir / "progress.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    # every 2 steps; scripted scores 0.2, 0.5 (best), 0.5, 0.4: two without a gain -> stop at 8
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert [e["score"] for e in evals] == pytest.approx([0.2, 0.5, 0.5, 0.4])
    assert all(isinstance(e["loss"], float) for e in evals)
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 9))  # not 12
    assert evals[-1]["stop"] and evals[-1]["best_step"] == 4
    assert any("val at step 8: 40.0" in m and "stopping" in m for m in messages)
    # The recipe's metric ran in the training process on every val row, once per evaluation.
    val = read_jsonl(run.rendered / "splits" / "val.jsonl")
    assert len(metric_calls) == 4 * len(val)
    assert [c["example"] for c in metric_calls[:len(val)]] == val
    assert all(isinstance(c["species"], str) for c in metric_calls)
    curve = json.loads((run.train_dir / "val_curve.json").read_text())
    assert curve["stopped_early"] and curve["ended_at"] == 8 and curve["max_steps"] == 12


@pytest.mark.slow
def test_the_best_checkpoint_not_the_last_is_merged_and_the_manifest_says_so(
        stopped_run, tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from copa.pipeline import stage_key

    run, _, _ = stopped_run
    train = run.manifest.stage("train")["artifacts"]
    assert Path(train["adapter"]).name == "checkpoint-4"
    assert train["best_step"] == 4 and train["ended_at"] == 8 and train["stopped_early"]
    # merged = base + the step-4 adapter's LoRA delta, not the final (step-8) adapter's
    name = "model.layers.0.self_attn.q_proj"
    base = load_file(tiny_model_dir / "model.safetensors")[f"{name}.weight"]
    merged = load_file(run.merged / "model.safetensors")[f"{name}.weight"]

    def with_delta(adapter_dir: Path) -> torch.Tensor:
        lora = load_file(adapter_dir / "adapter_model.safetensors")
        a = lora[f"base_model.model.{name}.lora_A.weight"]
        b = lora[f"base_model.model.{name}.lora_B.weight"]
        return base + (32 / 16) * b @ a  # lora_alpha / lora_r

    assert torch.allclose(merged, with_delta(Path(train["adapter"])), atol=1e-5)
    assert not torch.allclose(merged, with_delta(run.train_dir / "checkpoints"), atol=1e-5)
    # Which checkpoint was merged is part of the merge stage's key.
    run.keys["train"] = run.manifest.stage("train")["key"]
    key = stage_key(run, "merge")
    assert key == run.manifest.stage("merge")["key"]
    train["best_step"] = 6
    assert stage_key(run, "merge") != key
    train["best_step"] = 4


@pytest.mark.slow
def test_val_rows_are_never_training_rows_and_test_rows_never_scored(stopped_run) -> None:
    run, _, metric_calls = stopped_run
    spec = json.loads((run.train_dir / "val_eval.json").read_text())

    def last_user(messages: list[dict]) -> str:
        return [m["content"] for m in messages if m["role"] == "user"][-1]

    trained = {last_user(r["messages"]) for r in read_jsonl(run.rendered / "train.jsonl")}
    scored = {last_user(p) for p in spec["prompts"]}
    assert len(scored) == len(read_jsonl(run.rendered / "splits" / "val.jsonl"))
    assert not scored & trained
    fields = run.recipe.task.input_fields
    test = {tuple(r[f] for f in fields) for r in read_jsonl(run.rendered / "splits" /
                                                            "test.jsonl")}
    assert not {tuple(c["example"][f] for f in fields) for c in metric_calls} & test


def test_the_report_shows_the_val_curve_and_the_merged_checkpoint(tmp_path: Path) -> None:
    from copa.stages.report import markdown, write_report
    from copa.stats import summarize

    curve = {"metric": "label_accuracy", "rows": 15, "every": 8, "patience": 3,
             "min_delta": 0.0, "max_steps": 160, "best_step": 16, "best_score": 0.9,
             "stopped_early": True, "ended_at": 40,
             "evaluations": [{"step": s, "score": v, "loss": 0.1}
                             for s, v in [(8, 0.4), (16, 0.9), (24, 0.8), (32, 0.9), (40, 0.8)]]}
    report = {"recipe": "t", "metric": "label_accuracy", "test_rows": 2,
              **summarize({"finetune_only": [1.0, 0.0]}, resamples=50, seed=0),
              "versions": {}, "training_val": curve}
    text = markdown(report)
    assert ("val label_accuracy by step (15 rows): 8: 40.0, 16: 90.0 (best), 24: 80.0, "
            "32: 90.0, 40: 80.0; stopped early at step 40 of at most 160") in text
    assert "merged checkpoint-16" in text
    paths = write_report(tmp_path, report)
    assert paths["val_curve_png"].read_bytes().startswith(b"\x89PNG")


def test_a_recipe_without_the_new_keys_keeps_its_stage_keys(tmp_path: Path) -> None:
    """finetune.eval / early_stopping left out: the content keys hash what they hashed before
    the keys existed (runs made then keep their stages); set, they are part of them."""
    from copa.recipe import recipe_key_dict

    path = write_tiny_recipe(tmp_path, tmp_path / "model")
    plain = recipe_key_dict(load_recipe(path), "finetune")["finetune"]
    assert "eval" not in plain and "early_stopping" not in plain
    path.write_text(path.read_text().replace("finetune:\n", "finetune:\n" + EVAL))
    assert recipe_key_dict(load_recipe(path), "finetune")["finetune"]["eval"] == {
        "every": 2, "metric": None}


def test_a_resumed_training_remembers_its_curve_and_its_evaluation_steps(tmp_path: Path) -> None:
    """The callback alone (no training): evaluations come back from the checkpoint's
    log_history, an evaluated step is not scored twice, and eval steps ask for a log and, with
    early stopping, a checkpoint."""
    import transformers

    from copa.backends.axolotl_plugin import ValEvaluation
    from copa.backends.valcurve import LOG_KEY, write_spec

    spec = write_spec(tmp_path / "val_eval.json", {"every": 2, "patience": 2, "min_delta": 0.0,
                                                   "prompts": [], "examples": []})
    callback = ValEvaluation(str(spec))
    history = [{"loss": 1.0, "step": 1}] + [{LOG_KEY: {"step": s, "score": v}, "step": s}
                                            for s, v in [(2, 0.2), (4, 0.5), (6, 0.5)]]
    state = transformers.TrainerState(max_steps=9, global_step=6, log_history=history)
    callback.on_train_begin(None, state, transformers.TrainerControl())
    assert [e["step"] for e in callback.evaluations] == [2, 4, 6]
    # step 6 was scored before the kill: no model is needed to skip it
    callback.on_log(None, state, transformers.TrainerControl(), logs={"loss": 0.1})
    due = {}
    for step in (7, 8, 9):  # every 2, and the last step
        state.global_step = step
        control = callback.on_step_end(None, state, transformers.TrainerControl())
        due[step] = (control.should_log, control.should_save)
    assert due == {7: (False, False), 8: (True, True), 9: (True, True)}
