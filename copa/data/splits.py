"""Splits: load a source, map its columns (columns.py), dedupe, split train / val / test.

Splits are deterministic for a seed, stratified by label for classification, and never overlap
(rows are deduplicated on their input fields before splitting).
"""

from __future__ import annotations

import difflib
import json
import random
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copa.data.columns import GROUP, Row, map_columns
from copa.data.sources import DataError, data_problem, load_source
from copa.recipe import Problem, Recipe


@dataclass(frozen=True)
class Splits:
    train: list[Row]
    val: list[Row]
    test: list[Row]
    # what reading the data dropped without it being an error (render and validate say it)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Row]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def input_key(recipe: Recipe, row: Row) -> tuple[str, ...]:
    """A row's inputs as a reader sees them: Unicode NFC, each run of whitespace one space.
    'café' composed or decomposed, 'a  b' and 'a b' are one input: one kept by dedupe, never
    one in train and the other in test."""
    return tuple(" ".join(unicodedata.normalize("NFC", row[f]).split())
                 for f in recipe.task.input_fields)


def _copies_together(recipe: Recipe, rows: list[Row]) -> list[Row]:
    """The rows in their order, each input's copies right after its first (data.dedupe: false
    keeps them; they must land in one split)."""
    copies: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        copies[input_key(recipe, row)].append(row)
    return [row for group in copies.values() for row in group]


def dedupe(recipe: Recipe, rows: Iterable[Row], key: str = "data.source"
           ) -> tuple[list[Row], str | None]:
    """The rows with each input once (the first row kept), and a note of what was dropped:
    how many rows repeated an input, and how many of those said another answer."""
    kept: dict[tuple[str, ...], Row] = {}
    dropped = conflicting = 0
    outputs = recipe.task.output_fields
    for row in rows:
        first = kept.setdefault(input_key(recipe, row), row)
        if first is not row:
            dropped += 1
            conflicting += any(first.get(f) != row.get(f) for f in outputs)
    if not dropped:
        return list(kept.values()), None
    other = (f", {conflicting} of them with another {'/'.join(outputs)} than the row kept"
             if conflicting else "")
    return list(kept.values()), (f"{key}: {dropped} row(s) repeat an earlier row's input and "
                                 f"were dropped (data.dedupe){other}")


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


def _counts(sizes: list[int | float], total: int) -> list[int]:
    """Row counts of the splits: counts as given, fractions of `total` rounded. Fractions that
    fit in the rows (0.9 / 0.05 / 0.05) never ask for more rows than there are: where each
    rounded alone overshoots (13 of 12), the ones rounded up the most give a row back."""
    counts = [_count(size, total) for size in sizes]
    fractions = [i for i, size in enumerate(sizes) if not isinstance(size, int) and size < 1]
    exact = {i: float(sizes[i]) * total for i in fractions}
    fitting = sum(exact.values()) + sum(
        c for i, c in enumerate(counts) if i not in exact) <= total + 1e-9
    while fitting and sum(counts) > total:
        # a split keeps at least one row: never rounded down to none
        giving = [i for i in fractions if counts[i] > 1]
        if not giving:
            break
        counts[max(giving, key=lambda i: counts[i] - exact[i])] -= 1
    return counts


def check_labels(recipe: Recipe, rows: list[Row], key: str) -> None:
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
        spaced = next((u for u in unknown if u.strip() in choices), None)
        if spaced is not None:  # 'a, pos' in a CSV: the cell is ' pos'
            shown += (f" ({spaced!r} is the choice {spaced.strip()!r} with spaces around it: "
                      "strip them in the data)")
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
    check_labels(recipe, rows, "data.source")
    if test_rows is not None:
        check_labels(recipe, test_rows, "data.test_source")
    notes: list[str] = []
    if recipe.task.choices:  # a choice no row has is a label the model never sees
        seen = {_label(recipe, r) for r in rows + (test_rows or [])}
        absent = [c for c in recipe.task.choices if c not in seen]
        if absent:
            shown = ", ".join(map(repr, absent[:10])) + (" ..." if len(absent) > 10 else "")
            notes.append(f"task.choices: {len(absent)} of {len(recipe.task.choices)} choices "
                         f"have no row in the data: {shown}")
    if recipe.data.dedupe:
        rows, note = dedupe(recipe, rows)
        notes += [note] if note else []
        if test_rows is not None:
            test_rows, note = dedupe(recipe, test_rows, "data.test_source")
            notes += [note] if note else []
    grouped = recipe.data.group_by is not None
    if test_rows is not None:
        # Keep the held-out test split clean: no train/val row may repeat a test input, nor
        # share a group (an article, a paragraph) with one.
        test_keys = {input_key(recipe, r) for r in test_rows}
        test_groups = {r[GROUP] for r in test_rows} if grouped else set()
        rows = [r for r in rows
                if input_key(recipe, r) not in test_keys and r.get(GROUP) not in test_groups]

    sizes = recipe.data.splits
    rng = random.Random(sizes.seed)
    stratify = recipe.data.stratify and bool(recipe.task.choices) and not grouped
    # data.dedupe: false keeps repeated inputs, each input's copies in one split (a group of
    # their own), or a test row would be a train row
    together = not recipe.data.dedupe and not grouped
    if together:
        rows = [{**r, GROUP: input_key(recipe, r)} for r in rows]

    def order(items: list[Row]) -> list[Row]:
        items = list(items)
        if grouped:
            return _group_order(items, rng)
        if stratify:
            items = _stratified_order(recipe, items, rng)
        else:
            rng.shuffle(items)
        return _copies_together(recipe, items) if together else items

    pool = order(rows)
    total = len(pool) + (0 if test_rows is None else len(test_rows))
    n_train, n_val, n_test = _counts([sizes.train, sizes.val, sizes.test], total)
    whole = (f" in whole groups of data.group_by '{recipe.data.group_by}'" if grouped else
             " with each input's copies in one split (data.dedupe: false)" if together else "")
    if test_rows is None:
        parts = _cut(pool, [n_train, n_val, n_test], grouped or together)
        if parts is None:
            raise data_problem(recipe, "data.splits",
                           f"asks for {n_train + n_val + n_test} rows (train {n_train} + val "
                           f"{n_val} + test {n_test}){whole} but the data has {len(pool)} "
                           "after dedupe/filters")
        train, val, test = parts
    else:
        parts = _cut(pool, [n_train, n_val], grouped or together)
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
    return Splits(train=train, val=val, test=test, notes=notes)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    from copa.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n"
                                    for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
