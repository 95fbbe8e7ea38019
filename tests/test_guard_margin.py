"""The val guard's margin (optimize.guard_margin): a prompt-optimized program is kept only when it
beats the plain one on val by more than the margin. Real DSPy BootstrapFewShot on copa's real
batching engine, whose model answers from the prompt it is given (no DSPy part is mocked)."""

from __future__ import annotations

from collections.abc import Iterator

import dspy
import pytest
from conftest import LabelModel, engine_lm, label_exact, label_examples

from copa.dspy.search import beyond_margin, prompt_optimize
from copa.recipe import RecipeError, load_recipe
from copa.recipe.schema import Recipe


class DemoHelpedModel(LabelModel):
    """Right on 'good'/'bad' rows; on 'hard' rows right only when the prompt carries demos (more
    than one user turn, as ChatAdapter formats them). So demos gain exactly the hard rows."""

    path = "demo-helped"

    def label(self, chat: list[dict[str, str]]) -> str:
        text = chat[-1]["content"]
        with_demos = sum(m["role"] == "user" for m in chat) > 1
        return "pos" if "good" in text and ("hard" not in text or with_demos) else "neg"


@pytest.fixture
def lm() -> Iterator[dspy.LM]:
    with engine_lm(DemoHelpedModel(), "demo-helped") as helped:
        yield helped


def _recipe(margin: float) -> Recipe:
    return Recipe.model_validate({
        "name": "guard", "task": {"signature": "text -> label", "choices": ["pos", "neg"]},
        "data": {"source": "data.jsonl"},
        "optimize": {"optimizer": "BootstrapFewShot", "guard_margin": margin,
                     "params": {"max_bootstrapped_demos": 0, "max_labeled_demos": 2},
                     "num_threads": 2},
        "evaluate": {"metric": "label_accuracy"}})


# 10 val rows, one of them hard: demos gain exactly one row (10 points).
VAL = [f"good {i}" for i in range(5)] + [f"bad {i}" for i in range(4)] + ["hard good 9"]


@pytest.mark.parametrize("margin, kept", [(0.0, "optimized"), (0.05, "optimized"),
                                          (0.1, "plain"), (0.15, "plain")])
def test_a_gain_must_exceed_the_margin_to_be_kept(lm: dspy.LM, margin: float, kept: str) -> None:
    messages: list[str] = []
    result = prompt_optimize(_recipe(margin), dspy.Predict("text -> label"), lm,
                             dspy.ChatAdapter(), label_examples(["good 1", "bad 2"]),
                             label_examples(VAL), label_exact, emit=messages.append)
    assert result.val_scores == pytest.approx({"plain": 0.9, "optimized": 1.0})
    assert result.winner == kept
    assert result.demos == (2 if kept == "optimized" else 0)


def test_beyond_margin_keeps_plain_and_clear_gains_only() -> None:
    scores = {"plain": 0.5, "one_row": 0.5 + 1 / 30, "two_rows": 0.5 + 2 / 30, "worse": 0.4}
    assert beyond_margin(scores, 0.0) == list(scores)  # 0: the guard as before, any gain
    assert beyond_margin(scores, 0.05) == ["plain", "two_rows"]
    assert beyond_margin(scores, 2 / 30) == ["plain"]  # equal to the margin is not more


def test_a_margin_outside_0_to_1_is_a_recipe_error(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "pos"}\n')
    path.write_text("name: r\ntask: {signature: text -> label}\ndata: {source: data.jsonl}\n"
                    "optimize: {guard_margin: 5}\n")
    with pytest.raises(RecipeError, match="optimize.guard_margin"):
        load_recipe(path)


def test_the_report_says_what_margin_the_kept_program_needed(lm: dspy.LM) -> None:
    from copa.stages.report import markdown
    from copa.stats import summarize

    result = prompt_optimize(_recipe(0.1), dspy.Predict("text -> label"), lm, dspy.ChatAdapter(),
                             label_examples(["good 1", "bad 2"]), label_examples(VAL), label_exact,
                             emit=lambda _: None)
    report = {"recipe": "guard", "metric": "label_accuracy", "test_rows": 2,
              **summarize({arm: [1.0, 0.0] for arm in ("baseline", "prompt_only",
                                                       "finetune_only", "combined")},
                          resamples=50, seed=0),
              "prompt_optimization": {"combined": result.summary()},
              "settings": {"guard_margin": 0.1}, "versions": {"copa": "0"}}
    line = next(line for line in markdown(report).splitlines() if "Prompt stage" in line)
    assert "kept **plain**" in line and "val: plain 90.0, optimized 100.0" in line
    assert line.endswith("a candidate had to beat plain by more than 10.0 (guard_margin)")
    del report["settings"]
    assert "guard_margin" not in markdown(report)  # runs made before the key existed


def test_a_margin_without_the_guard_is_a_recipe_error(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "pos"}\n')
    path.write_text("name: r\ntask: {signature: text -> label}\ndata: {source: data.jsonl}\n"
                    "optimize: {guard: false, guard_margin: 0.05}\n")
    with pytest.raises(RecipeError, match=r"optimize: .*drop guard_margin, or write guard: true"):
        load_recipe(path)


def _entry(val_gain: float, pick: float, plain: float) -> dict:
    return {"val_gain": val_gain, "test": {"pick": pick, "plain": plain, "kept": None}}


def test_margin_outcomes_keep_the_pick_only_beyond_the_margin() -> None:
    from copa.stages.val import margin_outcomes

    entries = [_entry(0.1, 0.7, 0.6), _entry(0.05, 0.4, 0.6), _entry(0.0, 0.9, 0.6),
               _entry(-0.1, 0.2, 0.6), {"val_gain": None, "test": {}}]
    by_margin = {o["margin"]: o for o in margin_outcomes(entries, (None, 0.0, 0.05, 0.1))}
    assert by_margin[None]["kept_pick"] == 4      # the guard off: always the pick
    assert by_margin[None]["mean_test_gain"] == pytest.approx((0.1 - 0.2 + 0.3 - 0.4) / 4)
    assert by_margin[0.0]["entries"] == 4
    assert by_margin[0.0]["kept_pick"] == 2          # a tie (gain 0) keeps plain
    assert by_margin[0.0]["test_gains"] == pytest.approx([0.1, -0.2, 0.0, 0.0])
    assert by_margin[0.05]["kept_pick"] == 1         # a gain equal to the margin keeps plain
    assert by_margin[0.05]["mean_test_gain"] == pytest.approx(0.1 / 4)
    assert by_margin[0.1]["kept_pick"] == 0 and by_margin[0.1]["mean_test_gain"] == 0.0


def test_a_guard_entry_pairs_the_pick_with_the_plain_prompt_on_test() -> None:
    from copa.stages.report import guard_line
    from copa.stages.val import guard_entry

    info = {"winner": "plain", "val_scores": {"plain": 0.5, "optimized": 0.5}}
    plain, pick = [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]
    entry = guard_entry(info, plain, pick, plain, "finetune_only", resamples=200)
    assert entry["kept"] == "plain" and entry["val_gain"] == 0.0
    assert entry["test"] == {"kept": 0.75, "pick": 0.25, "plain": 0.75}
    assert entry["test_gain"]["value"] == pytest.approx(-0.5)
    lo, hi = entry["test_gain"]["ci95"]
    assert lo <= -0.5 <= hi <= 0
    line = guard_line("combined", entry)
    assert "kept **plain**" in line and "pick scored 25.0" in line and "-50.0" in line
