"""copa as DSPy's fine-tuning provider, the parts that need no training: DSPy's chat rows as
Axolotl rows, train_kwargs checked like recipe keys, the strategy key, and copa.lm's LM, whose
model id names the weights it runs on (real DSPy, the tiny real model, no Axolotl run)."""

from __future__ import annotations

from concurrent.futures import CancelledError
from pathlib import Path

import dspy
import pytest
from conftest import write_tiny_recipe

import copa
from copa.checks import strategy_problems
from copa.provider.finetune import (
    FinetuneError,
    axolotl_rows,
    one_answer_warning,
    with_train_kwargs,
)
from copa.recipe import RecipeError, load_recipe


def _chat_row() -> dict:
    signature = dspy.Signature("question -> answer", "Answer.")
    return dspy.ChatAdapter().format_finetune_data(
        signature, demos=[{"question": "1+1?", "answer": "2"}], inputs={"question": "2+2?"},
        outputs={"answer": "4"})


def test_dspy_chat_rows_train_on_the_final_assistant_turn_only() -> None:
    row = _chat_row()
    [converted] = axolotl_rows([row])
    messages = converted["messages"]
    assert [m["content"] for m in messages] == [m["content"] for m in row["messages"]]
    assert [m["training"] for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1]["role"] == "assistant" and "4" in messages[-1]["content"]
    assert sum(m["role"] == "assistant" for m in messages) == 2  # the demo's answer is context


@pytest.mark.parametrize("rows, message", [
    ([], "no training rows"),
    ([{"prompt": "x", "completion": "y"}], "expected DSPy's chat format"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "its last message is 'user'"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "a message needs a role"),
])
def test_rows_that_are_not_chat_rows_are_refused_clearly(rows: list, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        axolotl_rows(rows)


def _rows(*answers: str) -> list[dict]:
    return axolotl_rows([{"messages": [{"role": "user", "content": f"flower {n}"},
                                       {"role": "assistant", "content": answer}]}
                         for n, answer in enumerate(answers)])


def test_rows_that_all_teach_one_answer_are_warned_about_in_the_report() -> None:
    """Seen in the order study: `p -> w` on a base model at chance handed BootstrapFinetune 20
    rows, every one "setosa"."""
    from copa.stages.report import strategy_lines

    warning = one_answer_warning(_rows("setosa", "setosa", "setosa"))
    assert warning is not None and warning.startswith("all 3 fine-tuning rows")
    assert "'setosa'" in warning
    assert one_answer_warning(_rows("setosa", "setosa", "virginica")) is None
    assert one_answer_warning(_rows("setosa")) is None  # one row is not a pattern
    job = {"key": "f155aea381cd5361", "rows": 3, "base_model": "base", "seconds": 5.0,
           "warning": warning}
    info = {"strategy": "p -> w", "winner": "original", "candidates": [], "finetunes": [job]}
    assert f"    - **warning**: {warning}" in strategy_lines("combined", info)


def test_train_kwargs_are_checked_like_recipe_keys(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_tiny_recipe(tmp_path, tiny_model_dir))
    changed = with_train_kwargs(recipe, {"learning_rate": 5e-4, "max_steps": 2})
    assert (changed.finetune.learning_rate, changed.finetune.max_steps) == (5e-4, 2)
    assert recipe.finetune.learning_rate == 1e-3  # the recipe itself is unchanged
    with pytest.raises(RecipeError) as caught:
        with_train_kwargs(recipe, {"num_train_epochs": 2, "lora_r": 0})
    text = str(caught.value)
    assert "train_kwargs (over" in text
    assert "finetune.num_train_epochs: unknown key (did you mean 'num_epochs'?)" in text
    assert "finetune.lora_r: must be at least 1 (got 0)" in text


def test_strategy_is_normalized_and_checked(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_tiny_recipe(tmp_path, tiny_model_dir)
    assert load_recipe(path).optimize.strategy == "w -> p"
    recipe = load_recipe(path, overrides={"optimize.strategy": "p->w ->p"})
    assert recipe.optimize.strategy == "p -> w -> p"
    assert strategy_problems(recipe, "r.yaml") == []
    with pytest.raises(RecipeError, match="optimize.strategy: 'p -> x' is not a strategy"):
        load_recipe(path, overrides={"optimize.strategy": "p -> x"})
    with pytest.raises(RecipeError, match="with at least one 'w'"):
        load_recipe(path, overrides={"optimize.strategy": "p"})
    both = load_recipe(path, overrides={"optimize.strategy": "p -> w", "optimize.order": "p->w",
                                        "finetune.demos": "fixed"})
    problems = {p.path: p.message for p in strategy_problems(both, "r.yaml")}
    assert set(problems) == {"optimize.order", "finetune.demos"}
    assert "supersedes optimize.order" in problems["optimize.order"]
    plain = load_recipe(path, overrides={"finetune.demos": "program"})
    assert [p.path for p in strategy_problems(plain, "r.yaml")] == ["finetune.demos"]


@pytest.mark.parametrize("max_tokens", [0, -5, 2.5, True, "16"])
def test_copa_lm_refuses_a_max_tokens_that_is_no_token_count(tmp_path: Path,
                                                             max_tokens: object) -> None:
    """Before any model loads: 0 became the recipe's evaluate.max_tokens without a word, -5
    failed only at the first call."""
    with pytest.raises(ValueError, match="^max_tokens must be a whole number >= 1"):
        copa.lm(str(tmp_path / "no-model"), max_tokens=max_tokens, run_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_copa_lm_runs_on_the_model_its_id_names(tmp_path: Path, tiny_model_dir: Path) -> None:
    from copa.inference import engine as engines
    from copa.inference.router import model_id

    recipe = write_tiny_recipe(tmp_path, tiny_model_dir)
    lm = copa.lm(str(tiny_model_dir), recipe=recipe, run_dir=tmp_path / "run")
    assert isinstance(lm, dspy.LM) and isinstance(lm.provider, copa.AxolotlProvider)
    assert lm.provider.finetunable and lm.model == model_id(str(tiny_model_dir))
    assert lm.provider.finetunes_dir == tmp_path / "run" / "finetunes"
    lm.kill()
    lm.kill()  # idempotent: nothing loaded is fine
    assert not any(key[0] == str(tiny_model_dir) for key in engines._ENGINES)
    lm.launch()
    lm.launch()
    assert sum(key[0] == str(tiny_model_dir) for key in engines._ENGINES) == 1
    assert isinstance(lm("Say hi.", max_tokens=4)[0], str)
    # What DSPy's finetune hands back: a copy whose id names other weights runs on them.
    other = lm.copy(model=model_id(str(tmp_path / "no-such-model")))
    with pytest.raises(Exception, match="no-such-model"):
        other("Say hi.", max_tokens=4)
    lm.kill()
    assert not any(key[0] == str(tiny_model_dir) for key in engines._ENGINES)
    assert isinstance(lm("Say hi.", max_tokens=4)[0], str)  # loads again on use


def test_a_cancelled_job_stops_its_waiters_at_once() -> None:
    from copa.provider.lm import AxolotlTrainingJob

    job = AxolotlTrainingJob(model="copa/x", train_data=[])
    assert job.status() == "pending"
    assert job.cancel() is True
    assert job.status() == "cancelled"
    with pytest.raises(CancelledError):
        job.result(timeout=1)
    job.set_result("late")  # the training thread's own ending is ignored, not an error
