"""copa.load: one arm of a finished run as a callable DSPy program, bound to its model (through
the recipe's engine: copa's in-process batching engine by default) and its template adapter, so
new rows are prompted exactly as the model was trained and evaluated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dspy

from copa.data import format_value
from copa.data.columns import not_one_value
from copa.dspy.kit import make_adapter
from copa.dspy.lms import model_lm
from copa.dspy.program import make_program
from copa.dspy.retrieved import load_program
from copa.text import lone_surrogate
from copa.use.bundle import Bundle, open_bundle
from copa.use.limits import (
    InputLimit,
    InputRefused,
    check_finite,
    guessed_limit,
    limit_tokens,
    tokenizer_limit,
    total_tokens,
)


class LoadedProgram:
    """`program(**inputs).<output_field>`. Thread-safe: concurrent calls share one engine, which
    batches them. Close it (or use `with`) to stop a server engine the recipe started."""

    def __init__(self, bundle: Bundle, program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter,
                 stack: ExitStack, limit: InputLimit | None = None) -> None:
        self.bundle, self.program, self.lm, self.adapter = bundle, program, lm, adapter
        self.limit = limit  # each input field's token limit (None: unchecked)
        self._stack = stack

    @property
    def arm(self) -> str:
        return self.bundle.arm

    @property
    def input_fields(self) -> list[str]:
        return self.bundle.input_fields

    @property
    def output_fields(self) -> list[str]:
        return self.bundle.output_fields

    def inputs_for(self, values: Mapping[str, Any]) -> dict[str, str]:
        """The input fields as the model saw them in training (the recipe's number_format
        applied, as data loading applied it); a missing or unknown field, or one whose value is
        null or a list / object (not one text or number), is a TypeError, a field over the token
        limit an InputTooLong and a number that is not finite (NaN, inf) or that the format
        cannot take (an integer past float range for '.1f') an InputRefused (copa.use.limits),
        before the model sees anything."""
        missing = [f for f in self.input_fields if f not in values]
        unknown = [k for k in values if k not in self.input_fields]
        if missing or unknown:
            said = ([f"missing {', '.join(missing)}"] if missing else []) + \
                   ([f"unknown {', '.join(unknown)}"] if unknown else [])
            raise TypeError(f"{'; '.join(said)}: this task takes {', '.join(self.input_fields)}")
        for f in self.input_fields:  # as a data cell: format_value makes a list its repr
            kind = not_one_value(values[f])
            if kind is not None:
                raise TypeError(f"{f} is {kind}: give it one text or number")
        check_finite(values)
        number_format = self.bundle.recipe.prompt.number_format
        formatted = {f: formatted_input(f, values[f], number_format) for f in self.input_fields}
        if self.limit is not None:
            self.limit.check(formatted)
        return formatted

    def __call__(self, **inputs: Any) -> dspy.Prediction:
        values = self.inputs_for(inputs)
        # No call history: a long-lived server would keep every prompt and answer in memory.
        with dspy.context(lm=self.lm, adapter=self.adapter, disable_history=True):
            return self.program(**values)

    def answer(self, inputs: Mapping[str, Any]) -> dict[str, str]:
        """The output fields for one row of inputs, as plain strings."""
        prediction = self(**inputs)
        return {f: str(getattr(prediction, f, "") or "") for f in self.output_fields}

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LoadedProgram(arm={self.arm!r}, model={self.bundle.model_path!r}, "
                f"{', '.join(self.input_fields)} -> {', '.join(self.output_fields)})")


def formatted_input(field: str, value: Any, number_format: str | None) -> str:
    """One input field as data loading formats it (copa.data.format_value); a value that format
    cannot take is an InputRefused naming the field, not an OverflowError from deep inside."""
    try:
        text = format_value(value, number_format)
    except (OverflowError, ValueError) as exc:  # the messages name types, never the value
        raise InputRefused(f"{field}: cannot be formatted as the training data's numbers were "
                           f"(prompt.number_format {number_format!r}): {exc}") from None
    lone = lone_surrogate(text)
    if lone is not None:  # a JSON "\\ud800" escape: no tokenizer takes it (a TypeError deep inside)
        raise InputRefused(f"{field}: a lone surrogate \\u{ord(lone):04x} (half of a UTF-16 "
                           "pair) is not text")
    return text


def load(path: str | Path, arm: str = "best", emit: Callable[[str], None] = lambda _: None,
         max_input_tokens: int | None = None) -> LoadedProgram:
    """An arm of a finished run directory or `copa export` folder as a callable program.

    `arm="best"` is the arm with the best val score (report.json's val section; the test split
    never chooses); any of baseline, prompt_only, finetune_only, combined by name.
    `max_input_tokens`: each input field's limit (default: the recipe's finetune.sequence_len,
    within the model's context); a longer field raises InputTooLong before the model runs.
    """
    return load_bundle(open_bundle(path, arm), emit, max_input_tokens)


def input_limit(bundle: Bundle, lm: Any, max_tokens: int, how: str = "") -> InputLimit:
    """An InputLimit counting with the arm's model's tokenizer (the local engine's, else the
    model folder's; without either, guessed from bytes)."""
    tokenizer = getattr(getattr(getattr(lm, "engine", None), "model", None), "tokenizer", None)
    if tokenizer is None and Path(bundle.model_path).is_dir():
        try:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(
                bundle.model_path, trust_remote_code=bundle.recipe.model.trust_remote_code)
        except Exception:  # noqa: BLE001 - a folder without a tokenizer: guess from bytes
            tokenizer = None
    total = total_tokens(bundle.recipe, bundle.model_path)
    return tokenizer_limit(tokenizer, max_tokens, how, total) if tokenizer is not None \
        else guessed_limit(max_tokens, how, total)


def load_bundle(bundle: Bundle, emit: Callable[[str], None] = lambda _: None,
                max_input_tokens: int | None = None, how: str = "") -> LoadedProgram:
    """`how`: what a refusal of a long field tells the caller to change (a CLI option)."""
    recipe = bundle.recipe
    max_tokens = limit_tokens(recipe, bundle.model_path, max_input_tokens)
    program = make_program(recipe)
    if bundle.program_path is not None:  # a retrieved-demos program carries its train rows
        program = load_program(program, bundle.program_path)
    adapter = make_adapter(recipe, bundle.spec())
    stack = ExitStack()
    try:
        # No run directory: answers to new rows are not kept in the run's response cache.
        lm = stack.enter_context(model_lm(recipe, bundle.model_path, bundle.model_role,
                                          emit=emit))
        limit = input_limit(bundle, lm, max_tokens,
                            how or "copa.load(..., max_input_tokens=N) changes it")
    except BaseException:
        stack.close()
        raise
    return LoadedProgram(bundle, program, lm, adapter, stack, limit)
