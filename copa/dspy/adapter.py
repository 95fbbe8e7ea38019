"""A DSPy Adapter that formats and parses with copa's prompt template.

`format` and `format_finetune_data` both call `copa.prompting.build_messages`: the prompts DSPy
sends at inference are, by construction, the ones the model was fine-tuned on.

Only the task's own signature goes through the template. The other signatures an optimizer runs
(MIPROv2's instruction proposer, GEPA's reflection, dataset summaries) have other fields and
need DSPy's own formatting: they go to `WriterAdapter`, DSPy's ChatAdapter (with its JSONAdapter
fallback) made lenient where a small model needs it.
"""

from __future__ import annotations

import re
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from copa.prompting import (
    PromptSpec,
    build_messages,
    field_value,
    parse_completion,
    training_row,
)

_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def whole_sentences(text: str) -> str:
    """The text up to the end of its last whole sentence, with ChatAdapter's field markers and
    runs of whitespace removed; "" when no sentence ends in it."""
    text = " ".join(_MARKER.sub(" ", text).split())
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


class WriterAdapter(dspy.ChatAdapter):
    """ChatAdapter for the signatures an optimizer writes with (MIPROv2's instruction proposals
    and summaries). A small proposer often answers without ChatAdapter's field markers, or is
    cut off by max_tokens mid-word; for a one-field text answer this adapter takes the text
    itself and keeps its whole sentences, where ChatAdapter would fail the optimizer's run."""

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        fields = signature.output_fields
        one_text = len(fields) == 1 and next(iter(fields.values())).annotation is str
        try:
            parsed = super().parse(signature, completion)
        except AdapterParseError:
            if not one_text:
                raise
            parsed = {next(iter(fields)): completion}
        if one_text:
            name = next(iter(fields))
            parsed[name] = whole_sentences(parsed[name]) or " ".join(parsed[name].split())
        return parsed


class TemplateAdapter(dspy.Adapter):
    """Formats instructions, demos and inputs with a recipe's Jinja template (see prompting)."""

    def __init__(self, spec: PromptSpec, other: dspy.Adapter | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.other = other or WriterAdapter()

    def is_task(self, signature: type[dspy.Signature]) -> bool:
        """The task's signature (its inputs, its outputs, maybe ChainOfThought's reasoning),
        whatever instructions an optimizer gave it."""
        return (list(signature.input_fields) == list(self.spec.input_fields)
                and set(self.spec.output_fields) <= set(signature.output_fields))

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[dspy.Signature],
                 demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.is_task(signature):
            return self.other(lm, lm_kwargs, signature, demos, inputs)
        return super().__call__(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[dspy.Signature],
                    demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.is_task(signature):
            return await self.other.acall(lm, lm_kwargs, signature, demos, inputs)
        return await super().acall(lm, lm_kwargs, signature, demos, inputs)

    def _call_postprocess(self, processed_signature: type[dspy.Signature],
                          original_signature: type[dspy.Signature], outputs: list[Any],
                          lm: Any, lm_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        # A model that ends its turn at once (a fine-tune shown demos it never saw in training)
        # answered, with nothing: an empty, wrong answer, as parse() treats an unparsable one.
        # DSPy raises on it instead, which an optimizer's own evaluation counts as a failed
        # call, and past its max_errors the whole prompt search is cancelled.
        values = []
        for output in outputs:
            text = output.get("text") if isinstance(output, dict) else output
            if text or (isinstance(output, dict) and output.get("tool_calls")):
                values += super()._call_postprocess(processed_signature, original_signature,
                                                    [output], lm, lm_kwargs)
            else:
                values.append({name: "" for name in original_signature.output_fields})
        return values

    def _spec_for(self, signature: type[dspy.Signature]) -> PromptSpec:
        # Instructions may be rewritten by an optimizer (MIPROv2); the template stays the same.
        return self.spec.with_instructions(signature.instructions).with_fields(
            list(signature.input_fields), list(signature.output_fields))

    @staticmethod
    def _complete_demos(signature: type[dspy.Signature],
                        demos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = list(signature.input_fields) + list(signature.output_fields)
        kept = []
        for demo in demos:
            values = {k: demo.get(k) for k in wanted}
            if all(v is not None for v in values.values()):
                kept.append({k: field_value(v) for k, v in values.items()})
        return kept

    def format(self, signature: type[dspy.Signature], demos: list[dict[str, Any]],
               inputs: dict[str, Any]) -> list[dict[str, Any]]:
        spec = self._spec_for(signature)
        fields = {k: field_value(inputs[k]) for k in signature.input_fields if k in inputs}
        return build_messages(spec, fields, self._complete_demos(signature, demos))

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        parsed = parse_completion(completion, list(signature.output_fields))
        # A small model may drop a label; an empty value scores 0 instead of aborting a run.
        return {name: parsed.get(name, "") for name in signature.output_fields}

    def format_finetune_data(self, signature: type[dspy.Signature],
                             demos: list[dict[str, Any]], inputs: dict[str, Any],
                             outputs: dict[str, Any]) -> dict[str, list[Any]]:
        spec = self._spec_for(signature)
        example = {**{k: field_value(v) for k, v in inputs.items()},
                   **{k: field_value(v) for k, v in outputs.items()}}
        row = training_row(spec, example, self._complete_demos(signature, demos))
        return {"messages": [{"role": m["role"], "content": m["content"]}
                             for m in row["messages"]]}


class ChatRowsAdapter(dspy.ChatAdapter):
    """What DSPy's BootstrapFinetune formats its training rows with. It accepts only a
    ChatAdapter (it infers the data format from the class); this one writes each row with the
    adapter the program runs under (copa's TemplateAdapter), so training and inference share
    one format."""

    def __init__(self, adapter: dspy.Adapter, **kwargs: Any):
        super().__init__(**kwargs)
        self.adapter = adapter

    def format_finetune_data(self, signature: type[dspy.Signature],
                             demos: list[dict[str, Any]], inputs: dict[str, Any],
                             outputs: dict[str, Any]) -> dict[str, list[Any]]:
        return self.adapter.format_finetune_data(signature, demos, inputs, outputs)


def finetune_rows_adapter(adapter: dspy.Adapter) -> dspy.ChatAdapter:
    """The adapter to give BootstrapFinetune for a program that runs under `adapter`."""
    return adapter if isinstance(adapter, dspy.ChatAdapter) else ChatRowsAdapter(adapter)
