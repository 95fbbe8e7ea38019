"""Splits: map a source's rows onto signature fields, dedupe, split train / val / test.

Splits are deterministic for a seed, stratified by label for classification, and never overlap
(rows are deduplicated on their input fields before splitting).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copa.data.sources import DataError, data_problem, load_source
from copa.recipe import Problem, Recipe
from copa.text import lone_surrogate

# A task example: signature field -> text; `answers` (data.answers_column) is a list of texts.
Row = dict[str, Any]
GROUP = "_group"  # data.group_by's value, carried while splitting and dropped after


@dataclass(frozen=True)
class Splits:
    train: list[Row]
    val: list[Row]
    test: list[Row]

    def as_dict(self) -> dict[str, list[Row]]:
        return {"train": self.train, "val": self.val, "test": self.test}


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


def _kind(value: Any) -> str:
    return ("an object" if isinstance(value, Mapping) else
            "bytes" if isinstance(value, (bytes, bytearray)) else f"a {type(value).__name__}")


def not_one_value(value: Any) -> str | None:
    """What a value is when it cannot be one field's text ("null", "a list", "an object",
    "bytes", ...), else None: one rule for data cells and the inputs of a loaded run."""
    if value is None:
        return "null"
    return _kind(value) if isinstance(value, _NOT_ONE_VALUE) else None


def _text_problem(value: Any, where: str, fmt: str | None) -> tuple[str, str | None]:
    """(the value as text, None) or ("", why it is no text: null, a list, an object, bytes, a
    number past number_format, a lone surrogate)."""
    kind = not_one_value(value)
    if kind is not None:
        return "", (f"has null {where}" if value is None else
                    f"has {kind} {where}, where one text or number belongs")
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
    empty one too), 'gold' (an output the model is trained and scored on: not blank), 'answers'
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
    if problem is None and kind == "gold" and not text.strip():
        problem = f"has an empty gold '{column}'"
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
    fields = recipe.task.input_fields + recipe.task.output_fields
    if recipe.task.module == "chain_of_thought" and recipe.finetune.enabled:
        fields = [*recipe.task.input_fields, "reasoning", *recipe.task.output_fields]
    if not rows:
        raise data_problem(recipe, key, "no rows in the data")
    present = list(dict.fromkeys(k for row in rows for k in row))
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
    used = [(name, column, "gold" if name in outputs else "input",
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


def _input_key(recipe: Recipe, row: Row) -> tuple[str, ...]:
    return tuple(row[f].strip() for f in recipe.task.input_fields)


def dedupe(recipe: Recipe, rows: Iterable[Row]) -> list[Row]:
    seen: set[tuple[str, ...]] = set()
    kept = []
    for row in rows:
        key = _input_key(recipe, row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _label(recipe: Recipe, row: Row) -> str:
    return row[recipe.task.output_fields[-1]]


def _stratified_order(recipe: Recipe, rows: list[Row], rng: random.Random) -> list[Row]:
    """Interleave labels so any prefix holds them in the data's proportions."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[_label(recipe, row)].append(row)
    keyed = []
    for rank, label in enumerate(sorted(groups)):
        group = groups[label]
        rng.shuffle(group)
        offset = rng.random()
        keyed.extend(((i + offset) / len(group), rank, row) for i, row in enumerate(group))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [row for _, _, row in keyed]


def _group_order(rows: list[Row], rng: random.Random) -> list[Row]:
    """Rows group after group, groups and the rows inside each in a seeded random order."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row[GROUP]].append(row)
    names = sorted(groups)
    rng.shuffle(names)
    ordered = []
    for name in names:
        rng.shuffle(groups[name])
        ordered += groups[name]
    return ordered


def _cut(rows: list[Row], counts: list[int], grouped: bool) -> list[list[Row]] | None:
    """Consecutive parts of the given sizes, or None if the rows run out. Grouped (rows come
    group after group): a group goes to one part only; what of it overflows a full part is
    left out rather than spilling into the next."""
    if not grouped:
        if sum(counts) > len(rows):
            return None
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [rows[s:s + c] for s, c in zip(starts, counts, strict=True)]
    parts: list[list[Row]] = [[] for _ in counts]
    part, group = 0, None
    for row in rows:
        if row[GROUP] != group:
            group = row[GROUP]
            while part < len(counts) and len(parts[part]) >= counts[part]:
                part += 1
            if part == len(counts):
                break
        if len(parts[part]) < counts[part]:
            parts[part].append(row)
    return parts if all(len(p) == c for p, c in zip(parts, counts, strict=True)) else None


def _count(size: int | float, total: int) -> int:
    return int(size) if isinstance(size, int) or float(size) >= 1 else int(round(size * total))


def _check_labels(recipe: Recipe, rows: list[Row], key: str) -> None:
    choices = recipe.task.choices
    if not choices:
        return
    unknown = sorted({_label(recipe, r) for r in rows} - set(choices))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        composed = {unicodedata.normalize("NFC", c): c for c in choices}
        look_alike = next(((u, composed[n]) for u in unknown
                           if (n := unicodedata.normalize("NFC", u)) in composed), None)
        if look_alike:  # the same letters in other code points: say which, or it reads as a bug
            shown += (f" ({ascii(look_alike[0])} is the choice {ascii(look_alike[1])} in another "
                      "Unicode form: write one form in both)")
        raise data_problem(recipe, "task.choices",
                       f"{len(unknown)} label value(s) in {key} are not among the choices: "
                       f"{shown}; add them to task.choices or drop rows with data.filter_labels")


def _check_filter(recipe: Recipe, rows: list[Row]) -> None:
    """data.filter_labels names labels of the data (a misspelt one would drop its class
    silently), and keeps every label task.choices offers (a choice no row has is never a gold
    label: the model is offered an answer that is always wrong)."""
    keep = recipe.data.filter_labels or []
    problems = []
    dropped = [c for c in recipe.task.choices or [] if c not in keep]
    if dropped:
        problems.append(Problem(
            file=str(recipe.source_path), path="task.choices",
            message=f"{', '.join(map(repr, dropped))} "
                    f"{'is a choice' if len(dropped) == 1 else 'are choices'} that "
                    "data.filter_labels drops (no row keeps it as its label, so answering it "
                    "is always wrong): add it to data.filter_labels or remove it from "
                    "task.choices"))
    present = sorted({_label(recipe, r) for r in rows})
    for label in dict.fromkeys(keep):
        if label in present:
            continue
        close = difflib.get_close_matches(label, present, n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]!r}?" if close else
                f"labels present: {', '.join(present)}" if len(present) <= 20 else
                f"{len(present)} labels present")
        problems.append(Problem(file=str(recipe.source_path), path="data.filter_labels",
                                message=f"no row has the label {label!r} ({hint})"))
    if problems:
        raise DataError(problems)


def load_splits(recipe: Recipe) -> Splits:
    """Load, map, filter, dedupe and split the recipe's data."""
    rows = map_columns(recipe, load_source(recipe, recipe.data.source, "data.source"),
                       "data.source", recipe.data.source)
    test_rows: list[Row] | None = None
    if recipe.data.test_source:
        test_rows = map_columns(
            recipe, load_source(recipe, recipe.data.test_source, "data.test_source"),
            "data.test_source", recipe.data.test_source)
    if recipe.data.filter_labels is not None:
        _check_filter(recipe, rows + (test_rows or []))
        allowed = set(recipe.data.filter_labels)
        rows = [r for r in rows if _label(recipe, r) in allowed]
        if test_rows is not None:
            test_rows = [r for r in test_rows if _label(recipe, r) in allowed]
        if not rows:
            raise data_problem(recipe, "data.filter_labels", "no row has any of these labels")
    _check_labels(recipe, rows, "data.source")
    if test_rows is not None:
        _check_labels(recipe, test_rows, "data.test_source")
    if recipe.data.dedupe:
        rows = dedupe(recipe, rows)
        if test_rows is not None:
            test_rows = dedupe(recipe, test_rows)
    grouped = recipe.data.group_by is not None
    if test_rows is not None:
        # Keep the held-out test split clean: no train/val row may repeat a test input, nor
        # share a group (an article, a paragraph) with one.
        test_keys = {_input_key(recipe, r) for r in test_rows}
        test_groups = {r[GROUP] for r in test_rows} if grouped else set()
        rows = [r for r in rows
                if _input_key(recipe, r) not in test_keys and r.get(GROUP) not in test_groups]

    sizes = recipe.data.splits
    rng = random.Random(sizes.seed)
    stratify = recipe.data.stratify and bool(recipe.task.choices) and not grouped

    def order(items: list[Row]) -> list[Row]:
        items = list(items)
        if grouped:
            return _group_order(items, rng)
        if stratify:
            return _stratified_order(recipe, items, rng)
        rng.shuffle(items)
        return items

    pool = order(rows)
    total = len(pool) + (0 if test_rows is None else len(test_rows))
    n_train, n_val = _count(sizes.train, total), _count(sizes.val, total)
    n_test = _count(sizes.test, total)
    whole = f" in whole groups of data.group_by '{recipe.data.group_by}'" if grouped else ""
    if test_rows is None:
        parts = _cut(pool, [n_train, n_val, n_test], grouped)
        if parts is None:
            raise data_problem(recipe, "data.splits",
                           f"asks for {n_train + n_val + n_test} rows (train {n_train} + val "
                           f"{n_val} + test {n_test}){whole} but the data has {len(pool)} "
                           "after dedupe/filters")
        train, val, test = parts
    else:
        parts = _cut(pool, [n_train, n_val], grouped)
        if parts is None or n_test > len(test_rows):
            raise data_problem(recipe, "data.splits",
                           f"asks for train {n_train} + val {n_val} of {len(pool)} rows{whole} "
                           f"and test {n_test} of {len(test_rows)} rows")
        train, val = parts
        test = order(test_rows)[:n_test]
    for name, split in (("train", train), ("val", val), ("test", test)):
        if not split:
            raise data_problem(recipe, f"data.splits.{name}",
                           "this split is empty: give it at least one row")
    train, val, test = ([{k: v for k, v in r.items() if k != GROUP} for r in split]
                        for split in (train, val, test))
    return Splits(train=train, val=val, test=test)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    from copa.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n"
                                    for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
