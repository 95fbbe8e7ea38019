"""DSPy's own weight optimizers fine-tuning through copa: BootstrapFinetune with an LM from
copa.lm() trains and merges with real Axolotl and the program it returns runs on the merged
model; a failing training is a clear error from compile; a recipe with `strategy: "p -> w"`
runs BetterTogether end to end (tiny real model, real Axolotl, real DSPy)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dspy
import pytest
from conftest import write_tiny_recipe

import copa
from copa.data import read_jsonl

pytestmark = pytest.mark.slow

SIGNATURE = "sepal_length, sepal_width, petal_length, petal_width -> species"


def keep_every_trace(example, prediction, trace=None) -> bool:
    """A random tiny model is never right: keep its traces, so there are rows to train on."""
    return True


def _trainset(n: int) -> list[dspy.Example]:
    from sklearn.datasets import load_iris

    iris = load_iris()
    rows = []
    for features, target in list(zip(iris.data, iris.target))[::150 // n][:n]:
        values = dict(zip(SIGNATURE.split(" -> ")[0].split(", "), (f"{v:.1f}" for v in features)))
        rows.append(dspy.Example(**values, species=str(iris.target_names[target]))
                    .with_inputs(*values))
    return rows


def _finetune(lm: dspy.LM, trainset: list[dspy.Example], **kwargs) -> dspy.Module:
    """BootstrapFinetune as a DSPy user runs it, with copa's template adapter: a random model's
    answers parse (DSPy's ChatAdapter would fail on them), and the rows share its format."""
    from copa.dspy.adapter import finetune_rows_adapter

    student = dspy.Predict(SIGNATURE)
    student.set_lm(lm)
    adapter = dspy.settings.adapter
    optimizer = dspy.BootstrapFinetune(metric=keep_every_trace, num_threads=2,
                                       adapter=finetune_rows_adapter(adapter), **kwargs)
    return optimizer.compile(student, trainset=trainset)


@pytest.fixture(scope="module")
def template_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from copa.dspy.adapter import TemplateAdapter
    from copa.prompting import spec_from_recipe
    from copa.recipe import load_recipe

    recipe = write_tiny_recipe(tmp_path_factory.mktemp("adapter"), tiny_model_dir)
    adapter = TemplateAdapter(spec_from_recipe(load_recipe(recipe)))
    with dspy.context(adapter=adapter):
        yield adapter


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, template_adapter):
    folder = tmp_path_factory.mktemp("provider")
    recipe = write_tiny_recipe(folder, tiny_model_dir, max_steps=2)
    lm = copa.lm(str(tiny_model_dir), recipe=recipe, run_dir=folder / "run")
    trainset = _trainset(6)
    return _finetune(lm, trainset), lm, trainset, folder, recipe


def test_bootstrap_finetune_trains_through_axolotl(finetuned, tiny_model_dir: Path) -> None:
    from copa.inference.router import model_of

    program, lm, trainset, folder, _ = finetuned
    tuned = program.lm
    assert tuned.model != lm.model and tuned.provider is lm.provider
    merged = Path(model_of(tuned.model))
    assert merged.parent.parent == folder / "run" / "finetunes" and merged.name == "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    done = json.loads((merged.parent / "finetune.json").read_text())
    assert done["rows"] == len(trainset) and done["base_model"] == str(tiny_model_dir)
    rows = read_jsonl(merged.parent / "train.jsonl")
    assert all([m["training"] for m in row["messages"]].count(True) == 1 and
               row["messages"][-1]["training"] for row in rows)
    config = (merged.parent / "axolotl.yml").read_text()
    assert "type: chat_template" in config and "copa.backends.axolotl_plugin" in config


def test_the_returned_program_runs_on_the_merged_model(finetuned) -> None:
    from copa.inference import engine as engines
    from copa.inference.router import model_of

    program, _, trainset, _, _ = finetuned
    merged = model_of(program.lm.model)
    prediction = program(**trainset[0].inputs())
    assert isinstance(prediction.species, str)
    assert any(key[0] == merged for key in engines._ENGINES)  # its engine loaded the merged folder


def test_the_same_rows_reuse_the_finished_fine_tune(finetuned) -> None:
    _, lm, trainset, _, _ = finetuned
    again = _finetune(lm, trainset)
    assert again.lm.model == finetuned[0].lm.model
    assert [job["reused"] for job in lm.provider.history] == [False, True]


def test_a_failing_training_is_a_clear_error_from_compile(finetuned) -> None:
    from copa.backends import TrainError

    _, lm, trainset, _, _ = finetuned
    start = time.time()
    with pytest.raises(TrainError) as caught:
        _finetune(lm, trainset, train_kwargs={"axolotl": {"optimizer": "no_such_optim"}})
    assert time.time() - start < 300
    text = str(caught.value)
    assert "axolotl train failed" in text and "no_such_optim" in text and "full log:" in text


def test_a_bad_train_kwarg_is_a_recipe_error_from_compile(finetuned) -> None:
    from copa.recipe import RecipeError

    _, lm, trainset, _, _ = finetuned
    with pytest.raises(RecipeError, match="learning_rat: unknown key .did you mean "
                                          "'learning_rate'"):
        _finetune(lm, trainset, train_kwargs={"learning_rat": 1e-4})


METRIC = '''
def anything(example, prediction, trace=None):
    """Every answer passes: a random tiny model then has traces to fine-tune on."""
    return 1.0
'''


def test_a_recipe_with_strategy_p_w_runs_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    """...and COPAOptimizer.compile on the same recipe runs the same BetterTogether step."""
    from copa import COPAOptimizer, pipeline
    from copa.dspy.program import make_program, to_examples

    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, max_steps=2)
    text = recipe.read_text()
    recipe.write_text(text.replace("optimize:\n", "optimize:\n  strategy: 'p -> w'\n", 1)
                      .replace("metric: label_accuracy", "metric: 'anymetric:anything'", 1))
    (tmp_path / "anymetric.py").write_text(METRIC)
    messages: list[str] = []
    run = pipeline.run(recipe, run_dir=tmp_path / "run", emit=messages.append)
    report = json.loads((run.dir / "report.json").read_text())
    assert list(report["arms"]) == ["baseline", "prompt_only", "finetune_only", "combined"]
    assert report["settings"]["strategy"] == "p -> w"
    combined = report["prompt_optimization"]["combined"]
    assert [c["strategy"] for c in combined["candidates"]] == ["original", "p", "p -> w"]
    assert all(c["val_score"] == 1.0 for c in combined["candidates"])
    assert combined["training_rows_carried_demos"] is False
    [job] = combined["finetunes"]
    weights = combined["candidates"][-1]["model"]
    assert weights == job["model"] and Path(weights, "config.json").is_file()
    assert Path(weights) != run.merged  # BetterTogether's own fine-tune, not the pipeline's
    assert combined["winner"] == "original"  # ties go to the earliest candidate
    text = (run.dir / "report.md").read_text()
    assert "BetterTogether `p -> w` for combined: picked **original**" in text
    assert "training rows carried no demos (BootstrapFinetune exclude_demos=True)" in text
    assert "  - candidate `p -> w`: val 100.0" in text
    rows = read_jsonl(Path(weights).parent / "train.jsonl")
    assert rows and all(sum(m["role"] == "assistant" for m in r["messages"]) == 1 for r in rows)
    # The Python API: the same strategy key, the same step (its fine-tune from the cache).
    splits = {s: to_examples(run.recipe, read_jsonl(run.rendered / "splits" / f"{s}.jsonl"))
              for s in ("train", "val")}
    optimizer = COPAOptimizer(recipe, run_dir=run.dir, emit=messages.append)
    optimizer.compile(make_program(run.recipe), trainset=splits["train"], valset=splits["val"])
    assert optimizer.result is not None
    assert set(optimizer.result.val_scores) == {"original", "p", "p -> w"}
    assert optimizer.result.winner == combined["winner"]
    assert (run.dir / "compile" / "program_combined.json").is_file()
