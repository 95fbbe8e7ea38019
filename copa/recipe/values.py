"""What a recipe's numbers and names may be: the ranges of seeds, counts, token budgets and
rates (finite, with what to write instead), the field names a signature cannot use, and number
formats. Plain functions the schema's validators call (copa.recipe.schema)."""

from __future__ import annotations

import keyword
import math
import re

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

# Field names a signature cannot use, and who holds each: the prompt template's own variables
# (a field by that name would replace them: the instruction or the choices line vanishes from
# every training row), DSPy's Example / Prediction members (`prediction.keys` is a method, not
# the field), and pydantic's model namespace (DSPy signatures are pydantic models).
TEMPLATE_VARIABLES = ("instructions", "choices", "inputs", "outputs", "input_fields",
                      "output_fields")
DSPY_MEMBERS = ("completions", "copy", "from_completions", "get", "get_lm_usage", "inputs",
                "items", "keys", "labels", "set_lm_usage", "toDict", "values", "with_inputs",
                "without")
MAX_SEED = 2**32 - 1  # numpy and torch seeds
MAX_COUNT = 2**31 - 1  # steps, sizes: a 32-bit count
MAX_THREADS = 256
MAX_TOKENS = 131_072  # a token budget past any model's context

# Field metadata (json_schema_extra) of a recipe key added after run directories existed: while
# the key is at its default it is left out of the stage keys (copa.recipe.load.recipe_key_dict),
# so a run made before the key existed keeps its finished stages after an upgrade. A new key in a
# section a stage key covers needs it, or every earlier run re-runs that stage.
ADDED_LATER = {"added_later": True}


def field_name_problem(name: str) -> str | None:
    """Why `name` cannot be a signature field, with what to write instead; None if it can."""
    if not FIELD_NAME.match(name):
        return f"field name {name!r} is not an identifier"
    fix = f"rename it, e.g. '{name.strip('_') or 'field'}_text'"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return f"field name {name!r} is a Python keyword: {fix}"
    if name.startswith("_"):
        return f"field name {name!r} starts with '_', which pydantic keeps private: {fix}"
    if name.startswith("model_"):
        return f"field name {name!r} is in pydantic's reserved 'model_' namespace: {fix}"
    if name in TEMPLATE_VARIABLES:
        return (f"field name {name!r} is a variable the prompt template already has (it would "
                f"replace it in every prompt): {fix}")
    if name in DSPY_MEMBERS:
        return f"field name {name!r} is a member of DSPy's Example and Prediction: {fix}"
    return None


_FORMAT_SPEC = re.compile(r"^(?:.?[<>=^])?[+\- ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[eEfFgGn%]?\Z")


def number_format_checked(spec: str) -> str:
    """A Python format spec for numbers ('.1f', '.2e', '>6.2f'), or ValueError with the fix;
    width and precision at most 50 (format(x, '.100000000f') builds a 100 MB string)."""
    fix = "write a Python format spec for numbers, e.g. '.1f' or '.2e'"
    match = _FORMAT_SPEC.match(spec)
    if not match or not spec:
        raise ValueError(f"{spec!r} is not a number format: {fix}")
    if any(part and int(part) > 50 for part in match.groups()):
        raise ValueError(f"{spec!r}: width and precision are at most 50; {fix}")
    try:
        format(1.5, spec)
        format(2, spec)
    except ValueError as exc:
        raise ValueError(f"{spec!r} is not a number format ({exc}): {fix}") from None
    return spec


def bounded(value: float, low: float, high: float, *, low_open: bool = False,
            hint: str = "") -> float:
    """`value` if finite and within [low, high] ((low, high] with low_open); else ValueError
    saying the range, the value and `hint` (what to write instead)."""
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and \
        value <= high
    if not inside:
        left = "(" if low_open else "["
        said = f"must be a finite number in {left}{low:g}, {high:g}]" if isinstance(value, float) \
            or isinstance(low, float) or isinstance(high, float) \
            else f"must be a whole number from {low} to {high}"
        raise ValueError(f"{said} (got {value!r})" + (f"; {hint}" if hint else ""))
    return value
