"""How much one row may ask of the model: each input field's length in tokens, checked before
the engine sees the row (copa.load calls, copa predict rows, copa serve requests).

A field is refused when it is longer than the model was trained on (the recipe's
finetune.sequence_len) or than leaves room for the answer in the model's context; a caller may
give another limit, never past the context; all fields together never go past the context
either. A text far longer than the limit is refused without tokenizing it (more characters
than the limit times the longest token's), so a 100 MB field costs nothing.
Light: the tokenizer is handed in; nothing here loads one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from copa.data.columns import not_finite
from copa.models import context_length

if TYPE_CHECKING:
    from copa.recipe import Recipe

DEFAULT_TIMEOUT_S = 60.0  # copa serve: one request's time limit
BYTES_PER_TOKEN_GUESS = 4  # no tokenizer at hand (a model only a server knows): a rough count


class InputRefused(ValueError):
    """A row's input field refused before the model sees it (copa serve: 422; copa predict: the
    row's error); the message names the field, never the value."""


def check_finite(values: Mapping[str, Any]) -> None:
    """An InputRefused naming each field whose value is not a finite number
    (copa.data.columns.not_finite, the rule data cells follow too). The one check copa serve,
    copa predict and copa.load share."""
    odd = [f for f, v in values.items() if not_finite(v)]
    if odd:
        raise InputRefused(f"{', '.join(odd)}: not a finite number (NaN, Infinity or past the "
                           "float range)")


class InputTooLong(InputRefused):
    """A row's input field (or all of them together) is over the token limit; the message
    names the field and the limit, never the value."""

    def __init__(self, field: str, tokens: int | None, limit: int, how: str = "",
                 what: str = "per input field") -> None:
        self.field, self.tokens, self.limit = field, tokens, limit
        size = f"{tokens} tokens" if tokens is not None else "far more tokens"
        super().__init__(f"{field}: {size}, over the limit of {limit} tokens {what}"
                         + (f" ({how})" if how else ""))


@dataclass(frozen=True)
class InputLimit:
    """A token limit per input field (and for all fields together: the model's context less
    the answer), and how to count tokens."""

    max_tokens: int
    count: Callable[[str], int]
    chars_per_token: int = 64  # the longest token's length: more chars than limit x this is over
    how: str = ""  # how to change the limit, said in the refusal
    max_total: int | None = None  # all fields together (None: unknown context)

    def check(self, values: Mapping[str, Any]) -> None:
        """Raise InputTooLong for the first field over the limit, or for the fields together."""
        total = 0
        for field, value in values.items():
            text = value if isinstance(value, str) else str(value)
            if len(text) > self.max_tokens * self.chars_per_token:  # over, without counting
                raise InputTooLong(field, None, self.max_tokens, self.how)
            tokens = self.count(text) if text else 0
            if tokens > self.max_tokens:
                raise InputTooLong(field, tokens, self.max_tokens, self.how)
            total += tokens
        if self.max_total is not None and len(values) > 1 and total > self.max_total:
            raise InputTooLong(", ".join(values), total, self.max_total,
                               what="for the input fields together (the model's context, "
                                    "less the answer)")


def default_max_tokens(sequence_len: int, context: int | None, answer_tokens: int) -> int:
    """The per-field limit a recipe implies: what training rows could hold (sequence_len), and
    never more than the model's context leaves after the answer."""
    limit = int(sequence_len)
    if context:
        limit = min(limit, max(1, int(context) - int(answer_tokens)))
    return max(1, limit)


def choose_max_tokens(given: int | None, sequence_len: int, context: int | None,
                      answer_tokens: int) -> int:
    """The limit to use: the caller's, if any (checked against the context), else the default."""
    if given is None:
        return default_max_tokens(sequence_len, context, answer_tokens)
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"max_input_tokens must be a whole number >= 1 (got {given!r})")
    if context and given > context - answer_tokens:
        raise ValueError(f"max_input_tokens {given} leaves no room in the model's context of "
                         f"{context} tokens for a {answer_tokens}-token answer: use at most "
                         f"{max(1, context - answer_tokens)}")
    return given


def model_context(model_path: str) -> int | None:
    """A model folder's context length in tokens (copa.models.context_length of its
    config.json); None if unreadable."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return context_length(config) if isinstance(config, dict) else None


def limit_tokens(recipe: Recipe, model_path: str, given: int | None = None) -> int:
    """The token limit per input field for a recipe's model (ValueError for a given one past
    the model's context); known before the model loads."""
    return choose_max_tokens(given, recipe.finetune.sequence_len, model_context(model_path),
                             recipe.evaluate.max_tokens)


def total_tokens(recipe: Recipe, model_path: str) -> int | None:
    """What all input fields together may hold: the model's context less the answer."""
    context = model_context(model_path)
    return max(1, context - recipe.evaluate.max_tokens) if context else None


def tokenizer_limit(tokenizer: Any, max_tokens: int, how: str = "",
                    max_total: int | None = None) -> InputLimit:
    """An InputLimit counting with a Hugging Face tokenizer."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=64)
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary to list: a safe bound
        longest = 64
    return InputLimit(max_tokens, count, max(1, longest), how, max_total)


def guessed_limit(max_tokens: int, how: str = "", max_total: int | None = None) -> InputLimit:
    """An InputLimit without a tokenizer: tokens guessed from UTF-8 bytes."""

    def count(text: str) -> int:
        return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN_GUESS)

    return InputLimit(max_tokens, count, BYTES_PER_TOKEN_GUESS, how, max_total)
