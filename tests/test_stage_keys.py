"""Stage keys of runs made before a change never change with it: a finished run directory stays
cached after an upgrade. The keys of fixed recipes and fixed rendered files are pinned to the
values copa computed before the stage record (issue 25); a recipe key added later changes no key
while it is at its default, and a set one does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from copa import pipeline
from copa.checks import Checked
from copa.data import load_splits
from copa.pipeline import stage_key
from copa.prompting import spec_from_recipe
from copa.recipe import load_recipe
from copa.runs import Manifest, Run

VERSIONS = {"copa": "0.1.0", "axolotl": "0.19.0", "dspy": "3.4.1", "transformers": "5.16.1",
            "torch": "2.13.0+cpu", "peft": "0.20.0"}
ROWS = [{"text": f"row {i}", "label": "pos" if i % 3 else "neg", "group": f"g{i % 7}"}
        for i in range(40)]
TEMPLATE = ("{% block system %}{{ instructions }}{% endblock %}\n"
            "{% block user %}{% for name, value in inputs.items() %}{{ name }}: {{ value }}\n"
            "{% endfor %}{% endblock %}\n"
            "{% block assistant %}{{ outputs[output_fields[0]] }}{% endblock %}\n")
RECIPE: dict[str, Any] = {
    "name": "keys", "model": {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
    "data": {"source": "data.jsonl", "splits": {"train": 12, "val": 6, "test": 9, "seed": 0}},
    "prompt": {"template": "keys.j2"},
    "finetune": {"max_steps": 1, "sequence_len": 64},
    "serve": {"precision": "fp32"},  # auto would resolve by machine
    "evaluate": {"metric": "label_accuracy"}}
# Files the render stage would have written: their bytes are what later keys hash.
RENDERED = {"axolotl.yml": "base_model: tiny\n", "train.jsonl": '{"messages": []}\n',
            "val.jsonl": '{"messages": [1]}\n', "demos.json": "[]\n",
            "splits/train.jsonl": '{"text": "a"}\n', "splits/val.jsonl": '{"text": "b"}\n',
            "splits/test.jsonl": '{"text": "c"}\n'}

# stage -> key, computed on the code before the stage record (commit 1113d3d): a change that
# moves one of these makes every finished run re-run that stage and all after it.
PLAIN_KEYS = {
    "render": "88395d7fc9ffe921033e2892aa2d8fd9885577b43065ac02a9c3e93127c2822c",
    "train": "40a894e03e741f7aa8e037791cf2eae7414e32213663c23f6c9413b020ed82d2",
    "merge": "ffdb8273b679f4e7a6731e7bc8079425e429f84fba8ac8623d450252876abedd",
    "optimize": "fe7ccd4c35ba3954d2114eedfce70cbd081fd538c1478c7f779fa4ce1ebe8783",
    "evaluate": "2d995c8ec3a7a055665b7db47809d5ffc55eba1638b0f3771494686d57fb1dfd",
}
LATER_SET_KEYS = {
    "render": "9ec0507928eeb2c91ebba0e2011857b11270d02f2fa6a5d44ef7cf4f15bbfe53",
    "train": "2eac728836125692f7c06e57574eb6b29c5f3c7ac28868016387277d28a0abfa",
    "merge": "e14014eb4fe6c5b77fca2f5cfe5eeb3265d09c80073e4a0742ddd6e4d2f679b2",
    "optimize": "29fa24fe2f16ab9ee33f2b72d0bbe673ce4b41de8460411c3db8aab726a4986f",
    "evaluate": "b6004e087e3acd09a7333ddfe46b0a9516c15dcd78f4e4ef4211916f559c9435",
}
STRATEGY_KEYS = {
    "render": "88395d7fc9ffe921033e2892aa2d8fd9885577b43065ac02a9c3e93127c2822c",
    "train": "40a894e03e741f7aa8e037791cf2eae7414e32213663c23f6c9413b020ed82d2",
    "merge": "ffdb8273b679f4e7a6731e7bc8079425e429f84fba8ac8623d450252876abedd",
    "optimize": "ce8bdb809e5edd6d26badda86559cf2de615ea32b61a9ea7046799afa473b958",
    "evaluate": "b22a9c920c970d7e69d875246c0823248aa92887b8732b4b97e3b8d0fc7d3ca7",
}
WITH_PLAIN_KEYS = {
    "render": "88395d7fc9ffe921033e2892aa2d8fd9885577b43065ac02a9c3e93127c2822c",
    "train": "40a894e03e741f7aa8e037791cf2eae7414e32213663c23f6c9413b020ed82d2",
    "merge": "ffdb8273b679f4e7a6731e7bc8079425e429f84fba8ac8623d450252876abedd",
    "plain_finetune": "923b8aba5efa062d70e6823b2bad56c04dd2cd7ce97fa34076e365cd6565fa51",
    "optimize": "fe7ccd4c35ba3954d2114eedfce70cbd081fd538c1478c7f779fa4ce1ebe8783",
    "evaluate": "d1252bc6c0cdde261099cc191beaa1ea5f42e569403ebcc5afc98670d7ae38c8",
}


def _run(folder: Path, recipe: dict[str, Any], rendered: dict[str, str] = RENDERED) -> Run:
    """A Run over a fixed recipe and fixed rendered files, without the model check (the key
    reads no model) and without the run-directory lock."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "keys.j2").write_text(TEMPLATE)
    path = folder / "keys.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(path)
    checked = Checked(loaded, spec_from_recipe(loaded), load_splits(loaded))
    run_dir = folder / "run"
    for name, text in rendered.items():
        (run_dir / "rendered" / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "rendered" / name).write_text(text)
    return Run(recipe=loaded, checked=checked, dir=run_dir,
               manifest=Manifest.load(run_dir / "manifest.json"), emit=lambda _: None)


def _keys(run: Run, best_step: int | None = None) -> dict[str, str]:
    """Every stage's key in pipeline order, each stage's key feeding the next as it runs."""
    stages = ["render", "train", "merge", "optimize", "evaluate"]
    if run.trains_plain:
        stages.insert(3, "plain_finetune")
    if best_step is not None:
        run.manifest.stage("train")["artifacts"] = {"best_step": best_step}
    for stage in stages:
        run.keys[stage] = stage_key(run, stage)
    return dict(run.keys)


@pytest.fixture(autouse=True)
def _fixed_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "versions", lambda: dict(VERSIONS))


def _with(**sections: dict[str, Any]) -> dict[str, Any]:
    recipe = json.loads(json.dumps(RECIPE))
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


LATER_SET = {"optimize": {"order": "p->w", "guard_margin": 0.05},
             "finetune": {"eval": {"every": 1}, "early_stopping": {"patience": 2}},
             "data": {"group_by": "group"}}


def test_stage_keys_of_a_fixed_recipe_are_pinned(tmp_path: Path) -> None:
    assert _keys(_run(tmp_path / "plain", RECIPE)) == PLAIN_KEYS
    assert _keys(_run(tmp_path / "later", _with(**LATER_SET)), best_step=1) == LATER_SET_KEYS
    assert _keys(_run(tmp_path / "strategy",
                      _with(optimize={"strategy": "p -> w"}))) == STRATEGY_KEYS
    plain = {**RENDERED, "plain/axolotl.yml": "base_model: plain\n",
             "plain/train.jsonl": '{"messages": [2]}\n'}
    assert _keys(_run(tmp_path / "withplain", RECIPE, plain)) == WITH_PLAIN_KEYS


def test_a_key_added_later_changes_no_stage_key_at_its_default(tmp_path: Path) -> None:
    """Written out at its default, each key marked ADDED_LATER leaves every key as it was
    before the key existed; set to anything else, it changes the key of a stage it feeds."""
    defaults = _with(optimize={"strategy": "w -> p", "guard_margin": 0.0},
                     finetune={"eval": None, "early_stopping": None},
                     data={"loader": None, "loader_options": {}, "group_by": None,
                           "answers_column": None})
    assert _keys(_run(tmp_path / "defaults", defaults)) == PLAIN_KEYS
    for n, (section, values) in enumerate([("optimize", {"guard_margin": 0.05}),
                                           ("data", {"group_by": "group"}),
                                           ("finetune", {"eval": {"every": 1}})]):
        keys = _keys(_run(tmp_path / f"set{n}", _with(**{section: values})))
        assert keys != PLAIN_KEYS, (section, values)


def test_a_run_that_leaves_an_optimized_arm_out_has_its_own_optimize_key(tmp_path: Path) -> None:
    # A run evaluated with arms [finetune_only] wrote no prompt programs; the same recipe with
    # every arm must run the prompt stage, not reuse that one (it then failed on a missing
    # program_prompt_only.json). Every arm written out keeps the pinned key.
    every = _with(evaluate={"arms": ["baseline", "prompt_only", "finetune_only", "combined"]})
    assert _keys(_run(tmp_path / "every", every))["optimize"] == PLAIN_KEYS["optimize"]
    fewer = _keys(_run(tmp_path / "fewer", _with(evaluate={"arms": ["finetune_only"]})))
    assert fewer["optimize"] != PLAIN_KEYS["optimize"]
    assert fewer["train"] == PLAIN_KEYS["train"]
