"""report.md from report.json's data (copa.stages.report.markdown), on hand-made reports: the
synergy verdict follows its CI, synergy is against the best of every single-lever arm (a
demo-trained fine-tune prompted plainly included), and the table says each arm's model and
prompt."""

from __future__ import annotations

from typing import Any

import pytest

from copa.stages.report import markdown, plot
from copa.stats import summarize


def _report(per_arm: dict[str, list[float]]) -> dict[str, Any]:
    return {"recipe": "t", "metric": "label_accuracy", "test_rows": 8,
            **summarize(per_arm, resamples=200, seed=0), "versions": {"copa": "0"}}


# combined right on every row, each single arm on half: a clear synergy, CI above 0
STRONG = {"baseline": [0.0] * 8, "prompt_only": [1, 0] * 4, "finetune_only": [0, 1] * 4,
          "combined": [1.0] * 8}


def test_a_synergy_whose_ci_is_above_zero_beats() -> None:
    report = _report(STRONG)
    assert report["synergy"]["ci95"][0] > 0
    text = markdown(report)
    assert "50.0 points" in text and "combined beats the best single-lever arm" in text


def test_a_synergy_whose_ci_straddles_zero_is_not_significant() -> None:
    report = _report({"baseline": [0.0] * 8, "prompt_only": [1, 0] * 4,
                      "finetune_only": [1, 0] * 4, "combined": [1, 1, 0, 0] * 2})
    text = markdown(report)
    assert "no significant synergy (CI includes 0)" in text
    assert "beats" not in text


@pytest.mark.parametrize("with_plot", [False, True])
def test_synergy_is_against_every_single_lever_arm_and_the_table_says_model_and_prompt(
        with_plot: bool) -> None:
    """A demo-trained fine-tune prompted plainly (demo_finetune) right on every row is a
    single lever of its own: the combined arm's equal score is then no synergy at all."""
    report = _report({**STRONG, "demo_finetune": [1.0] * 8})
    assert report["synergy"]["value"] == 0.0 and report["synergy"]["ci95"] == [0.0, 0.0]
    report["arms"]["demo_finetune"] |= {"model": "demo-trained fine-tune (merged; rows with "
                                                 "random train demos, k in [0, 3] per row)",
                                       "prompt": "plain"}
    report["arms"]["finetune_only"] |= {"model": "demo-free fine-tune (plain/merged)",
                                        "prompt": "plain"}
    text = markdown(report)
    assert "not comparable" not in text and "beats" not in text
    assert ("| demo-aware fine-tune only | demo-trained fine-tune (merged; rows with random "
            "train demos, k in [0, 3] per row) | plain | 100.0 |") in text
    assert "| fine-tune-only | demo-free fine-tune (plain/merged) | plain | 50.0 |" in text
    assert ("**Synergy** (combined − max(prompt-only, fine-tune-only, demo-aware fine-tune "
            "only)): 0.0 points") in text
    if with_plot:
        assert plot(report)[:4] == b"\x89PNG"


def test_the_prompt_stage_shows_the_instruction_it_kept_and_what_the_optimizer_proposed() -> None:
    """What the prompt stage did is visible: the kept program's instruction and demo count,
    and the optimizer's own instruction when the val guard did not keep it."""
    import dspy

    from copa.dspy.search import PromptResult

    plain = dspy.Predict(dspy.Signature("text -> label", "Label the text."))
    proposed = plain.deepcopy()
    proposed.signature = proposed.signature.with_instructions("Decide  if the text\nis kind.")
    proposed.demos = [dspy.Example(text="nice", label="pos")]
    summary = PromptResult(plain, "plain", {"plain": 0.5, "optimized": 0.4},
                           optimized=proposed).summary()
    assert summary["kept"] == [{"predictor": "self", "instructions": "Label the text.",
                                "demos": []}]
    assert summary["optimizer_pick"][0]["demos"] == [{"text": "nice", "label": "pos"}]
    text = markdown({**_report(STRONG), "prompt_optimization": {"combined": summary}})
    assert '  - instruction kept (self): "Label the text."; 0 demos' in text
    assert '  - the optimizer proposed (self): "Decide if the text is kind."' in text


def test_a_kept_retrieved_program_says_its_demos_are_chosen_per_input() -> None:
    """The retrieved-demos program holds no demos of its own: the report must not say '0 demos'
    under a prompt stage that kept it with 3 demos a prompt."""
    summary = {"winner": "optimized", "demos": 3, "optimized_demos": 3,
               "val_scores": {"plain": 0.45, "optimized": 0.49},
               "retrieved": {"k": 3, "by": "bm25"},
               "kept": [{"predictor": "self", "instructions": "Label the text.", "demos": []}]}
    text = markdown({**_report(STRONG), "prompt_optimization": {"combined": summary}})
    assert ('  - instruction kept (self): "Label the text."; 3 demos chosen per input (bm25)'
            in text)
    assert "; 0 demos" not in text
