"""Issue 12.3: with `serve: {engine: openai}` each arm asks the user's server for its own model;
a recipe where the fine-tuned arms would ask for the base model is rejected by `copa validate`
(exit 2, `file: serve.models: ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_bad_inputs import BASE, _write_case

from copa.cli import cli
from copa.recipe.schema import Recipe

API = "http://127.0.0.1:9/v1"  # never contacted: building a server LM opens no connection

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("one-model-for-both-arms", {"set": {"serve": {"engine": "openai", "api_base": API,
                                                   "model": "base-model"}}},
     "serve.models: serve.model 'base-model' would be asked for by the base AND the fine-tuned "
     "arms"),
    ("no-merged-model", {"set": {"serve": {"engine": "openai", "api_base": API,
                                           "models": {"base": "base-model"}}}},
     "serve.models: engine 'openai' with fine-tuning needs the fine-tuned model's id"),
    ("no-model-at-all", {"set": {"serve": {"engine": "openai", "api_base": API}}},
     "serve.models: engine 'openai' with fine-tuning needs the fine-tuned model's id"),
    ("same-model-twice", {"set": {"serve": {"engine": "openai", "api_base": API,
                                            "models": {"base": "m", "merged": "m"}}}},
     "serve.models: base and merged are both 'm'"),
    ("models-and-model", {"set": {"serve": {"engine": "openai", "api_base": API, "model": "m",
                                            "models": {"base": "a", "merged": "b"}}}},
     "serve.models: write serve.models or serve.model, not both"),
    ("models-for-local-engine", {"set": {"serve": {"models": {"base": "a", "merged": "b"}}}},
     "serve.models: only for engine 'openai'"),
    ("models-typo", {"set": {"serve": {"engine": "openai", "api_base": API,
                                       "models": {"base": "a", "merge": "b"}}}},
     "serve.models.merge: unknown key (did you mean 'merged'?)"),
]


@pytest.mark.parametrize("case, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_ambiguous_server_model_is_rejected(tmp_path: Path, case: dict[str, Any],
                                               expected: str) -> None:
    path = _write_case(tmp_path, case)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith(str(tmp_path)), output
    assert expected in output, output


@pytest.mark.parametrize("case", [
    {"set": {"serve": {"engine": "openai", "api_base": API,
                       "models": {"base": "base-model", "merged": "tuned-model"}}}},
    # One model is unambiguous when nothing is fine-tuned, or no arm uses the fine-tuned model.
    {"set": {"serve": {"engine": "openai", "api_base": API, "model": "m"},
             "finetune.enabled": False}},
    {"set": {"serve": {"engine": "openai", "api_base": API, "model": "m"},
             "evaluate.arms": ["baseline", "prompt_only"]}},
], ids=["models", "no-finetune", "base-arms-only"])
def test_an_unambiguous_server_model_is_accepted(tmp_path: Path, case: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["validate", str(_write_case(tmp_path, case))])
    assert result.exit_code == 0, result.output


def test_each_arm_asks_the_server_for_its_own_model() -> None:
    from copa.dspy.lms import model_lm

    recipe = Recipe.model_validate({**BASE, "serve": {
        "engine": "openai", "api_base": API,
        "models": {"base": "base-model", "merged": "tuned-model"}}})
    asked = {}
    for role in ("base", "merged"):  # the names the optimize and evaluate stages pass
        with model_lm(recipe, f"/models/{role}", role) as lm:
            asked[role] = lm.model
    assert asked["base"].endswith("/base-model")
    assert asked["merged"].endswith("/tuned-model")
