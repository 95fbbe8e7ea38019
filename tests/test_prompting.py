"""One format everywhere: the rows Axolotl trains on are the prompts DSPy sends, plus the target."""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from copa.dspy.adapter import TemplateAdapter
from copa.prompting import (
    PromptError,
    PromptTemplate,
    build_messages,
    find_template,
    load_spec,
    parse_completion,
    training_row,
)

FIELDS_IN = ("sepal_length", "petal_length")


@pytest.fixture()
def spec():
    return load_spec(find_template("prompts/default.jinja"), "Name the species.", FIELDS_IN,
                     ("species",), ("setosa", "virginica"))


EXAMPLE = {"sepal_length": "5.1", "petal_length": "1.4", "species": "setosa"}
DEMO = {"sepal_length": "6.3", "petal_length": "4.9", "species": "virginica"}


def test_default_template_renders_system_user_assistant(spec) -> None:
    messages = build_messages(spec, EXAMPLE, target=EXAMPLE)
    assert messages == [
        {"role": "system",
         "content": "Name the species.\nAnswer with exactly one of: setosa, virginica."},
        {"role": "user", "content": "sepal_length: 5.1\npetal_length: 1.4"},
        {"role": "assistant", "content": "setosa"},
    ]


def test_training_row_trains_only_on_the_final_answer(spec) -> None:
    row = training_row(spec, EXAMPLE, demos=[DEMO])
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user",
                                                    "assistant"]
    assert [m["training"] for m in row["messages"]] == [False, False, False, False, True]


def test_adapter_prompt_plus_target_is_the_training_row(spec) -> None:
    signature = dspy.Signature("sepal_length, petal_length -> species", "Name the species.")
    adapter = TemplateAdapter(spec)
    inputs = {k: EXAMPLE[k] for k in FIELDS_IN}
    prompt = adapter.format(signature, [DEMO], inputs)
    row = training_row(spec, EXAMPLE, demos=[DEMO])
    plain = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    assert prompt + [{"role": "assistant", "content": "setosa"}] == plain
    finetune = adapter.format_finetune_data(signature, [DEMO], inputs, {"species": "setosa"})
    assert finetune["messages"] == plain


def test_adapter_uses_optimized_instructions(spec) -> None:
    signature = dspy.Signature("sepal_length, petal_length -> species", "Be a botanist.")
    prompt = TemplateAdapter(spec).format(signature, [], {k: EXAMPLE[k] for k in FIELDS_IN})
    assert prompt[0]["content"].startswith("Be a botanist.")


def test_parse_is_the_inverse_of_the_assistant_block(spec) -> None:
    assert parse_completion(" virginica \n", ["species"]) == {"species": "virginica"}
    two = spec.with_fields(FIELDS_IN, ("reasoning", "species"))
    text = two.assistant_message({**EXAMPLE, "reasoning": "short petals"})
    assert parse_completion(text, ["reasoning", "species"]) == {
        "reasoning": "short petals", "species": "setosa"}


def test_sandbox_refuses_attribute_walks() -> None:
    template = PromptTemplate.from_string(
        "{% block user %}{{ ''.__class__.__mro__ }}{% endblock %}"
        "{% block assistant %}x{% endblock %}")
    with pytest.raises(PromptError, match="refused by the sandbox"):
        template.render_block("user", {})


def test_template_needs_user_and_assistant_blocks() -> None:
    with pytest.raises(PromptError, match="missing block"):
        PromptTemplate.from_string("{% block system %}hi{% endblock %}")


def test_shipped_templates_load() -> None:
    paths = sorted(Path(find_template("prompts/default.jinja")).parent.glob("*.jinja"))
    assert len(paths) >= 5  # default, question, context, passages, reasoning
    for path in paths:
        template = PromptTemplate.from_file(path)
        assert template.path == str(path) and template.text == path.read_text()


def test_only_the_task_signature_goes_through_the_template(spec) -> None:
    """An optimizer's own signatures (an instruction proposer here) are formatted by DSPy's
    ChatAdapter, not squeezed into the task template with its label list; the task's
    signature, also with ChainOfThought's reasoning or new instructions, uses the template."""
    lm = dspy.utils.DummyLM([{"proposed_instruction": "Classify the flower."},
                             {"species": "setosa"}, {"reasoning": "small", "species": "setosa"}])
    proposer = dspy.Predict("basic_instruction, tip -> proposed_instruction")
    task = dspy.Predict(dspy.Signature("sepal_length, petal_length -> species", "Be exact."))
    thinking = dspy.ChainOfThought("sepal_length, petal_length -> species")
    inputs = {k: EXAMPLE[k] for k in FIELDS_IN}
    with dspy.context(lm=lm, adapter=TemplateAdapter(spec)):
        assert proposer(basic_instruction="Name it.", tip="be short").proposed_instruction \
            == "Classify the flower."
        task(**inputs)  # DummyLM answers in DSPy's markers; only the prompts matter here
        thinking(**inputs)
    sent = [entry["messages"] for entry in lm.history]
    proposer_text = "\n".join(m["content"] for m in sent[0])
    assert "[[ ## proposed_instruction ## ]]" in proposer_text
    assert "Answer with exactly one of" not in proposer_text
    assert sent[1] == build_messages(spec.with_instructions("Be exact."), inputs)
    assert "Answer with exactly one of: setosa, virginica." in sent[2][0]["content"]
