"""A DSPy Adapter that formats and parses with copa's prompt template.

`format` and `format_finetune_data` both call `copa.prompting.build_messages`: the prompts DSPy
sends at inference are, by construction, the ones the model was fine-tuned on.
"""

from __future__ import annotations

from typing import Any

import dspy

from copa.prompting import PromptSpec, build_messages, parse_completion, training_row


class TemplateAdapter(dspy.Adapter):
    """Formats instructions, demos and inputs with a recipe's Jinja template (see prompting)."""

    def __init__(self, spec: PromptSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec

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
                kept.append({k: str(v) for k, v in values.items()})
        return kept

    def format(self, signature: type[dspy.Signature], demos: list[dict[str, Any]],
               inputs: dict[str, Any]) -> list[dict[str, Any]]:
        spec = self._spec_for(signature)
        fields = {k: str(inputs[k]) for k in signature.input_fields if k in inputs}
        return build_messages(spec, fields, self._complete_demos(signature, demos))

    def parse(self, signature: type[dspy.Signature], completion: str) -> dict[str, Any]:
        parsed = parse_completion(completion, list(signature.output_fields))
        # A small model may drop a label; an empty value scores 0 instead of aborting a run.
        return {name: parsed.get(name, "") for name in signature.output_fields}

    def format_finetune_data(self, signature: type[dspy.Signature],
                             demos: list[dict[str, Any]], inputs: dict[str, Any],
                             outputs: dict[str, Any]) -> dict[str, list[Any]]:
        spec = self._spec_for(signature)
        example = {**{k: str(v) for k, v in inputs.items()},
                   **{k: str(v) for k, v in outputs.items()}}
        row = training_row(spec, example, self._complete_demos(signature, demos))
        return {"messages": [{"role": m["role"], "content": m["content"]}
                             for m in row["messages"]]}
