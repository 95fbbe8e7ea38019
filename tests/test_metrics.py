"""Metrics read the answer field the way a grader would."""

from __future__ import annotations

import dspy

from copa.dspy.metrics import gsm8k_number, make_metric, to_choice, token_f1


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
