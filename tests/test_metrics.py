"""Metrics read the answer field the way a grader would."""

from __future__ import annotations

import dspy
import pytest
from pydantic import ValidationError

from copa.dspy.metrics import gsm8k_number, make_metric, to_choice, token_f1
from copa.metrics import exact_match, label_accuracy
from copa.recipe.schema import TaskSection


def test_gsm8k_takes_the_number_after_the_marker_else_the_last_one() -> None:
    assert gsm8k_number("3 + 4 = 7\n#### 1,234") == 1234.0
    assert gsm8k_number("#### 12 apples, not 3") == 12.0
    assert gsm8k_number("first 5, then 7") == 7.0
    assert gsm8k_number("no number") is None


def test_label_accuracy_maps_free_text_onto_a_choice() -> None:
    choices = ["setosa", "versicolor", "virginica"]
    assert to_choice("Virginica.\nBecause...", choices) == "virginica"
    assert to_choice("It is setosa", choices) == "setosa"
    metric = make_metric("label_accuracy", "species", choices)
    gold = dspy.Example(species="setosa")
    assert metric(gold, dspy.Prediction(species=" Setosa ")) == 1.0
    assert metric(gold, dspy.Prediction(species="virginica")) == 0.0
    assert metric(gold, dspy.Prediction(species="setosa"), trace=object()) is True


def test_token_f1_and_exact_match() -> None:
    assert token_f1("the cat sat", "cat sat") == 0.8
    exact = make_metric("exact_match", "a")
    assert exact(dspy.Example(a="Paris"), dspy.Prediction(a="paris.")) == 1.0


def test_a_different_label_never_scores_as_the_label() -> None:
    """Signs, '+' and '#' tell labels apart; case and trailing punctuation do not, and a label
    the scorer could confuse with another is refused (the schema test below)."""
    assert label_accuracy("-1", "1", ["-1", "0", "1"]) == 0.0
    assert label_accuracy("1", "-1", ["-1", "0", "1"]) == 0.0
    assert label_accuracy("-1", "The answer is -1.", ["-1", "0", "1"]) == 1.0
    assert label_accuracy("1", "The answer is -1.", ["-1", "0", "1"]) == 0.0  # '1' inside '-1'
    for wrong in ("C#", "C", "c#."):
        assert label_accuracy("C++", wrong, ["C", "C++", "C#"]) == 0.0
    assert label_accuracy("C++", "I would say c++.", ["C", "C++", "C#"]) == 1.0
    assert label_accuracy("C", "I would say c++.", ["C", "C++", "C#"]) == 0.0
    # Choices only case tells apart (refused by validate): the exact one, else no label at all.
    assert label_accuracy("Pos", "pos", ["Pos", "pos", "neg"]) == 0.0
    assert label_accuracy("Pos", "POS", ["Pos", "pos", "neg"]) == 0.0
    assert label_accuracy("Pos", "POS.", ["Pos", "neg"]) == 1.0  # case alone names one choice
    assert exact_match(":)", "") == 0.0
    assert exact_match(":)", ":) ") == 1.0
    assert token_f1(":)", "") == 0.0
    assert exact_match("-1", "1") == 0.0


def test_what_answers_carry_around_a_label_still_names_it() -> None:
    """What the published runs' answers carry (bench/rescore.py re-scores them): case, quotes,
    markdown, trailing punctuation, a sentence naming the label, a label ending in '?'."""
    iris = ["setosa", "versicolor", "virginica"]
    for answer in ("Setosa.", '"setosa"', "**setosa**", "(setosa)", "The answer is: setosa.",
                   "setosa wnętr", "- setosa"):
        assert label_accuracy("setosa", answer, iris) == 1.0, answer
    bank = ["reverted_card_payment?", "card_payment_fee_charged"]
    for answer in ("reverted_card_payment?", "reverted_card_payment", "Reverted_card_payment?.",
                   "It is reverted_card_payment?"):
        assert label_accuracy("reverted_card_payment?", answer, bank) == 1.0, answer
    assert label_accuracy("card_payment_fee_charged", "reverted_card_payment?", bank) == 0.0
    assert label_accuracy("setosa", "setosa or virginica", iris) == 0.0  # names two


def test_choices_the_scorer_cannot_tell_apart_are_refused() -> None:
    TaskSection(signature="text -> label", choices=["-1", "0", "1"])
    TaskSection(signature="text -> label", choices=["C", "C++", "C#"])
    with pytest.raises(ValidationError, match="'Pos' and 'pos' are one label to the scorer"):
        TaskSection(signature="text -> label", choices=["Pos", "neg", "pos"])


def test_a_label_in_either_unicode_form_is_one_label() -> None:
    """'café' as one code point (NFC) or as 'e' and a combining accent (NFD): a model may write
    either, and the scorer reads them as one; choices that differ only so are refused. An ASCII
    label is untouched (the published runs' labels all are)."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    choices = [composed, "the"]
    assert label_accuracy(composed, decomposed, choices) == 1.0
    assert label_accuracy(composed, f"It is {decomposed.upper()}.", choices) == 1.0
    assert label_accuracy(composed, "cafe", choices) == 0.0
    assert exact_match(decomposed, composed) == 1.0
    assert token_f1(f"le {decomposed}", f"le {composed}") == 1.0
    with pytest.raises(ValidationError, match=r"'caf\\xe9' and 'cafe\\u0301' are one label "
                                              "in two Unicode forms"):
        TaskSection(signature="text -> label", choices=[composed, decomposed, "tea"])
    with pytest.raises(ValidationError, match="one label to the scorer"):
        TaskSection(signature="text -> label", choices=["Caf\u00e9", decomposed])
