"""Recipe features end to end on small real parts: `--set`, `finetune.demos: fixed`, `hf:` data
from a local saved dataset, and the `copa.run()` Python API with a user module and a user metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_recipe

from copa.cli import cli
from copa.data import load_splits, read_jsonl
from copa.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
IRIS = REPO / "recipes" / "iris.yaml"


def _last_user(row: dict) -> str:
    return [m["content"] for m in row["messages"] if m["role"] == "user"][-1]


def test_set_overrides_reach_the_recipe_and_are_checked_like_it() -> None:
    runner = CliRunner()
    plain = runner.invoke(cli, ["validate", str(IRIS)])
    assert "train 60, val 15, test 74" in plain.output
    result = runner.invoke(cli, ["validate", str(IRIS), "--set", "data.splits.train=30",
                                 "--set", "data.splits={train: 12, val: 6, test: 9}"])
    assert result.exit_code == 0, result.output
    assert "train 12, val 6, test 9" in result.output  # the later --set wins
    bad = runner.invoke(cli, ["validate", str(IRIS), "--set", "finetune.lora_rr=8"])
    assert bad.exit_code == 2
    assert "finetune.lora_rr: unknown key (did you mean 'lora_r'?)" in bad.output
    no_value = runner.invoke(cli, ["validate", str(IRIS), "--set", "finetune.lora_r"])
    assert no_value.exit_code == 2
    assert "write KEY.PATH=VALUE" in no_value.output


def test_fixed_demos_are_in_every_training_row_and_never_its_target(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    result = CliRunner().invoke(cli, ["render", str(IRIS), "-o", str(out),
                                      "--set", "finetune.demos=fixed",
                                      "--set", "finetune.num_demos=3"])
    assert result.exit_code == 0, result.output
    demos = json.loads((out / "demos.json").read_text())
    assert sorted(d["species"] for d in demos) == ["setosa", "versicolor", "virginica"]
    train_split = read_jsonl(out / "splits" / "train.jsonl")
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == len(train_split) - 3  # the demo rows are not also targets
    demo_answers = [d["species"] for d in demos]
    for row in rows:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(users) == 4 and answers[:3] == demo_answers  # 3 demo turns, then the target
        assert [m["training"] for m in row["messages"]].count(True) == 1
        assert row["messages"][-1]["training"] is True
    demo_users = {u for u in (
        [m["content"] for m in rows[0]["messages"] if m["role"] == "user"][:3])}
    assert not demo_users & {_last_user(r) for r in rows}


def test_hf_source_reads_a_saved_dataset_folder_without_the_hub(tmp_path: Path) -> None:
    import datasets

    rows = [{"text": f"message {i}", "label": "pos" if i % 2 else "neg"} for i in range(30)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:24]),
        "test": datasets.Dataset.from_list(rows[24:]),
    }).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "r.yaml").write_text(
        "name: hf-local\ntask: {signature: 'text -> label', choices: [pos, neg]}\n"
        "data: {source: 'hf:saved', test_source: 'hf:saved:test', "
        "splits: {train: 16, val: 4, test: 6}}\n")
    splits = load_splits(load_recipe(tmp_path / "r.yaml"))
    assert {r["text"] for r in splits.test} == {f"message {i}" for i in range(24, 30)}
    assert {r["text"] for r in splits.train + splits.val} <= {f"message {i}" for i in range(24)}
    assert len(splits.train) == 16 and len(splits.val) == 4
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace(
        "hf:saved:test", "hf:saved:validation"))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "data.test_source: hf:saved:validation: no split 'validation'" in result.output


USER_MODULE = '''\
import dspy


class AlwaysVirginica(dspy.Module):
    """Asks the model (a real LM call), then answers 'virginica' whatever it said."""

    def __init__(self, signature):
        super().__init__()
        self.predict = dspy.Predict(signature)

    def forward(self, **inputs):
        self.predict(**inputs)
        return dspy.Prediction(species="virginica")
'''

USER_METRIC = '''\
def says_virginica(example, prediction, trace=None):
    """Ignores the gold label: 1 when the answer is 'virginica'."""
    return float(getattr(prediction, "species", "") == "virginica")
'''


def test_python_api_runs_a_user_module_and_a_user_metric(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copa.run() with overrides, no fine-tuning: the user's module answers and the user's
    metric scores. With the built-in label_accuracy a constant answer scores 1/3 on the
    stratified test split; with the plain Predict the random tiny model never says virginica."""
    import copa

    folder = tmp_path / "task"
    recipe = write_tiny_recipe(folder, tiny_model_dir)
    (folder / "copa_test_usermod.py").write_text(USER_MODULE)
    (folder / "copa_test_usermetric.py").write_text(USER_METRIC)
    monkeypatch.syspath_prepend(str(folder))  # the recipe's folder, as a user's PYTHONPATH
    messages: list[str] = []
    run = copa.run(str(recipe), run_dir=tmp_path / "run", emit=messages.append, overrides={
        "finetune.enabled": False,
        "task.module": "copa_test_usermod:AlwaysVirginica",
        "evaluate.metric": "copa_test_usermetric:says_virginica",
        "optimize.optimizer": "BootstrapFewShot",
        "optimize.params": {"max_bootstrapped_demos": 1, "max_labeled_demos": 1}})
    assert run.dir == tmp_path / "run"
    assert "[train] running" not in messages  # finetune.enabled: false from the overrides
    report = json.loads((run.dir / "report.json").read_text())
    assert list(report["arms"]) == ["baseline", "prompt_only"]
    assert report["metric"] == "copa_test_usermetric:says_virginica"
    baseline = read_jsonl(run.dir / "predictions" / "baseline.jsonl")
    assert {p["prediction"] for p in baseline} == {"virginica"}
    assert {p["gold"] for p in baseline} == {"setosa", "versicolor", "virginica"}
    assert report["arms"]["baseline"]["score"] == 1.0
