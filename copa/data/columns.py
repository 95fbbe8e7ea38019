"""Columns: a source's rows as copa's rows, each signature field one text (or a list of texts
for data.answers_column), with every cell checked: present, one value, text or number, gold not
blank. Numbers are shown as data.number_format says (inputs only).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from copa.data.sources import DataError, data_problem
from copa.recipe import Problem, Recipe
from copa.registry import METRICS
from copa.text import lone_surrogate

# A task example: signature field -> text; `answers` (data.answers_column) is a list of texts.
Row = dict[str, Any]
GROUP = "_group"  # data.group_by's value, carried while splitting and dropped after

def format_value(value: Any, number_format: str | None) -> str:
    """A data value as the text a prompt holds: a number, or a text that is a plain decimal
    number (a CSV cell: '4', '-0.5', '1e-05'), through number_format; any other text as it is
    ('nan', 'inf', '1_000' and ' 4' are words, not numbers, though float() takes them). A
    yes/no value is written as JSON and YAML write it ('true'), not as Python does ('True').
    A number too large for a float is a ValueError, not 'inf'."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        # numpy's (a pandas row, a user loader's rows): formatted as the number they are, not
        # str()'s "5" where number_format '.1f' made the training data's ints "5.0"
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, (int, float)) and number_format:
        try:
            return format(value, number_format)
        except OverflowError:  # an int past a float's range
            raise ValueError(_TOO_LARGE.format(number_format)) from None
    if isinstance(value, str):
        if number_format and _DECIMAL.fullmatch(value):
            number = float(value)
            if math.isinf(number):  # '1e400', 400 digits
                raise ValueError(_TOO_LARGE.format(number_format))
            return format(number, number_format)
        return value
    return str(value)


# A number as a CSV writes one: ASCII digits, an optional sign, point and exponent; nothing
# around it. float() takes more ('nan', 'Infinity', '1_000', ' 4 ', Arabic-Indic digits).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TOO_LARGE = "a number too large for number_format '{}' (a float stops at 1.8e308)"
_NOT_ONE_VALUE = (list, tuple, set, frozenset, Mapping, bytes, bytearray)
_FIRST_LINE = " / ".join(n for n, m in METRICS.items() if m.first_line)


def first_line_scored(recipe: Recipe) -> bool:
    """Whether a metric of the recipe scores the answer's first line only (evaluate.metric, or
    finetune.eval's own): then every gold answer must be one line."""
    names = [recipe.evaluate.metric]
    if recipe.finetune.eval is not None and recipe.finetune.eval.metric:
        names.append(recipe.finetune.eval.metric)
    return any(n in METRICS and METRICS[n].first_line for n in names)


def _kind(value: Any) -> str:
    return ("an object" if isinstance(value, Mapping) else
            "bytes" if isinstance(value, (bytes, bytearray)) else f"a {type(value).__name__}")


def not_one_value(value: Any) -> str | None:
    """What a value is when it cannot be one field's text ("null", "a list", "an object",
    "bytes", ...), else None: one rule for data cells and the inputs of a loaded run."""
    if value is None:
        return "null"
    return _kind(value) if isinstance(value, _NOT_ONE_VALUE) else None


def not_finite(value: Any) -> bool:
    """A float NaN or infinity (numpy's too): Python's JSON parser takes NaN and Infinity (not
    JSON) and makes 1e400 inf, pandas reads an empty CSV cell as NaN, and such a value has no
    number for a model to read. One rule for data cells and the inputs of a loaded run."""
    return (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
            and not math.isfinite(value))


def _text_problem(value: Any, where: str, fmt: str | None) -> tuple[str, str | None]:
    """(the value as text, None) or ("", why it is no text: null, a list, an object, bytes, a
    number that is not finite or past number_format, a lone surrogate)."""
    kind = not_one_value(value)
    if kind is not None:
        return "", (f"has null {where}" if value is None else
                    f"has {kind} {where}, where one text or number belongs")
    if not_finite(value):
        return "", (f"has {float(value)!r} {where}, not a finite number (a missing value, or past "
                    "the float range): fill it in or drop the row")
    try:
        text = format_value(value, fmt)
    except ValueError:
        return "", f"has {_TOO_LARGE.format(fmt)} {where}"
    if (lone := lone_surrogate(text)) is not None:
        return "", (f"has a lone surrogate \\u{ord(lone):04x} {where}: half of a "
                    "UTF-16 pair, which is not text")
    return text, None


def _cell(row: Mapping[str, Any], column: str, kind: str,
          fmt: str | None) -> tuple[Any, str | None]:
    """One data cell as its field's value, or why it cannot be: kind is 'input' (any text, the
    empty one too), 'gold' (an output the model is trained and scored on: not blank), 'label'
    (the answer a first-line metric scores: a gold of one line), 'answers'
    (data.answers_column: a list of gold texts, or one) or 'group' (data.group_by)."""
    if column not in row:
        return None, f"lacks '{column}'"
    value = row[column]
    if kind == "answers":
        if value is None:
            return None, f"has null for '{column}'"
        if isinstance(value, Mapping):
            return None, f"has an object for '{column}', where a list of answer texts belongs"
        answers = []
        for item in value if isinstance(value, (list, tuple)) else [value]:
            text, problem = _text_problem(item, f"among its '{column}'", None)
            if problem is None and not text.strip():
                problem = f"has an empty answer among its '{column}'"
            if problem:
                return None, problem
            answers.append(text)
        return answers, None
    text, problem = _text_problem(value, f"for '{column}'", fmt)
    if problem is None and kind in ("gold", "label") and not text.strip():
        problem = f"has an empty gold '{column}'"
    if problem is None and kind == "label" and "\n" in text.strip():
        problem = (f"has a gold '{column}' of several lines, which {_FIRST_LINE} never "
                   "matches (it reads the answer's first line): make it one line, or score "
                   "with exact_match")
    return text, problem


def _row_problems(recipe: Recipe, key: str, source: str,
                  bad: Mapping[str, list[int]]) -> DataError:
    """One line per kind of problem: its first row, and how many more rows have it."""
    label = str(recipe.source_path) if recipe.source_path else "<recipe>"
    where = f"{source}: " if source else ""
    problems = []
    for why, rows in bad.items():
        more = ""
        if len(rows) > 1:
            shown = ", ".join(map(str, rows[1:6])) + (", ..." if len(rows) > 6 else "")
            more = f" (and {len(rows) - 1} more: row {shown})"
        problems.append(Problem(file=label, path=key,
                                message=f"{where}row {rows[0]} {why}{more}"))
    return DataError(problems)


def map_columns(recipe: Recipe, rows: list[dict[str, Any]], key: str,
                source: str = "") -> list[Row]:
    """Rename data columns onto signature fields (data.columns: field -> column). Every row must
    hold every column the recipe uses, each one text or number (a list for data.answers_column)
    and each gold output not blank; else a DataError naming the source, the row and the
    column. Rows are numbered from 1 as the source gives them (a CSV's header is no row)."""
    if not rows:
        raise data_problem(recipe, key, "no rows in the data")
    present = list(dict.fromkeys(k for row in rows for k in row))
    fields = recipe.task.input_fields + recipe.task.output_fields
    # A chain-of-thought fine-tune trains on the data's reasoning; without fine-tuning the
    # column is still kept where the data has it (labeled demos show worked solutions).
    if recipe.task.module == "chain_of_thought" and (
            recipe.finetune.enabled or recipe.data.columns.get("reasoning", "reasoning")
            in present):
        fields = [*recipe.task.input_fields, "reasoning", *recipe.task.output_fields]
    problems = []
    columns = {name: recipe.data.columns.get(name, name) for name in fields}
    reader: dict[str, str] = {}  # column -> the first field that reads it
    for name in fields:
        other = reader.setdefault(columns[name], name)
        if other != name:
            outputs = set(recipe.task.output_fields)
            leak = (" (the model would see its gold answer as input)"
                    if (name in outputs) != (other in outputs) else "")
            problems.append(Problem(
                file=str(recipe.source_path),
                path=f"data.columns.{name if name in recipe.data.columns else other}",
                message=f"fields '{other}' and '{name}' both map to column '{columns[name]}'"
                        f"{leak}: give each field its own column"))
    answers = recipe.data.answers_column
    for name in recipe.task.input_fields:
        if answers is not None and columns[name] == answers:
            problems.append(Problem(
                file=str(recipe.source_path), path="data.answers_column",
                message=f"'{answers}' is the column of input field '{name}': the model would "
                        "see the gold answers as input"))
    for name in fields:
        column = recipe.data.columns.get(name, name)
        if column not in present:
            path = f"data.columns.{name}" if name in recipe.data.columns else "data.columns"
            hint = ("" if name != "reasoning" else
                    " (chain_of_thought fine-tuning needs a 'reasoning' column)")
            problems.append(Problem(
                file=str(recipe.source_path), path=path,
                message=f"field '{name}' maps to column '{column}', which the data lacks{hint}; "
                        f"columns present: {', '.join(map(str, present))}"))
    for name in recipe.data.columns:
        if name not in fields:
            problems.append(Problem(file=str(recipe.source_path), path=f"data.columns.{name}",
                                    message=f"'{name}' is not a field of the signature "
                                            f"({', '.join(fields)})"))
    for key_name in ("answers_column", "group_by"):
        column = getattr(recipe.data, key_name)
        if column is not None and column not in present:
            problems.append(Problem(file=str(recipe.source_path), path=f"data.{key_name}",
                                    message=f"no column '{column}' in the data; columns "
                                            f"present: {', '.join(map(str, present))}"))
    if problems:
        raise DataError(problems)
    fmt = recipe.prompt.number_format
    outputs = set(recipe.task.output_fields)
    inputs = set(recipe.task.input_fields)
    # number_format is how inputs are shown; what the model writes (a gold output, a CoT
    # 'reasoning') stays the data's text: '4' is not '4.0' to task.choices or to a scorer.
    answer = recipe.task.output_fields[-1]
    gold = "label" if first_line_scored(recipe) else "gold"
    used = [(name, column, (gold if name == answer else "gold") if name in outputs else "input",
             fmt if name in inputs else None) for name, column in columns.items()]
    if answers is not None:
        used.append(("answers", answers, "answers", None))
    if recipe.data.group_by is not None:
        used.append((GROUP, recipe.data.group_by, "group", None))
    mapped = []
    bad: dict[str, list[int]] = {}
    for number, row in enumerate(rows, 1):
        out = {}
        for name, column, kind, number_format in used:
            out[name], problem = _cell(row, column, kind, number_format)
            if problem is not None:
                bad.setdefault(problem, []).append(number)
        mapped.append(out)
    if bad:
        raise _row_problems(recipe, key, source, bad)
    return mapped
