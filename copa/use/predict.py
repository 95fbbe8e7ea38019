"""copa predict: rows of a CSV / JSONL / JSON / Parquet file through a loaded arm, one output row
per input row, in order. A row whose call fails gets its error in the row; the others go on.

Rows go to the program from several threads at once, so the engine batches them (as it batches
DSPy's evaluation threads).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from copa.data.loaders import read_table
from copa.text import one_line
from copa.use.limits import InputRefused

# Keys each output row adds after the input row's own columns.
PREDICTION_KEY, ERROR_KEY = "prediction", "error"


class InputError(Exception):
    """An input file that cannot be predicted on (the CLI exits 2 with the message)."""


class Answerer(Protocol):
    input_fields: list[str]

    def answer(self, inputs: Mapping[str, Any]) -> dict[str, str]: ...


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an input file; a missing or unreadable file is an InputError."""
    try:
        return read_table(Path(path), section=None)  # no recipe keys to set: -i is the file
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None


def column_for(field: str, present: Sequence[str], columns: Mapping[str, str]) -> str | None:
    """The column holding an input field: the field's own name, else the recipe's data.columns
    name for it (so the data file the run trained on can be predicted on as it is)."""
    if field in present:
        return field
    mapped = columns.get(field)
    return mapped if mapped in present else None


def check_columns(rows: Sequence[Mapping[str, Any]], fields: Sequence[str],
                  columns: Mapping[str, str], label: str) -> dict[str, str]:
    """{field: column} for every input field, or an InputError naming what is missing and the
    columns present."""
    if not rows:
        raise InputError(f"{label}: no rows")
    present = list(dict.fromkeys(k for row in rows for k in row))
    taken = [k for k in (PREDICTION_KEY, ERROR_KEY) if k in present]
    if taken:
        raise InputError(f"{label}: column(s) {', '.join(taken)} would be overwritten by the "
                         "output; rename them")
    found = {f: column_for(f, present, columns) for f in fields}
    missing = [f for f, column in found.items() if column is None]
    if missing:
        raise InputError(f"{label}: missing column(s) {', '.join(missing)} (the task's inputs are "
                         f"{', '.join(fields)}); columns present: {', '.join(map(str, present))}")
    return {f: str(c) for f, c in found.items()}


def predict_rows(program: Answerer, rows: Sequence[Mapping[str, Any]],
                 mapping: Mapping[str, str], threads: int = 8,
                 progress: Callable[[int], None] = lambda _: None) -> list[dict[str, Any]]:
    """Each input row, with "prediction" (the output fields) and "error" (None, or why this row
    failed, starting "row N: ", N counted from 1) added, in input order. `progress(n)` is
    called as rows finish."""

    def one(n: int, row: Mapping[str, Any]) -> dict[str, Any]:
        try:
            absent = [f for f, column in mapping.items() if column not in row]
            if absent:  # a JSON row without a key the others have
                raise ValueError(f"row lacks {', '.join(absent)}")
            answer = program.answer({f: row[column] for f, column in mapping.items()})
            return {**row, PREDICTION_KEY: answer, ERROR_KEY: None}
        except InputRefused as exc:  # refused before the model saw it
            return {**row, PREDICTION_KEY: None, ERROR_KEY: f"row {n}: {exc}"}
        except Exception as exc:  # this row's failure, reported in its row
            return {**row, PREDICTION_KEY: None,
                    ERROR_KEY: one_line(f"row {n}: {type(exc).__name__}: {exc}", 500)}
        finally:
            progress(1)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="copa-predict") as pool:
        return list(pool.map(one, range(1, len(rows) + 1), rows))


def output_line(row: Mapping[str, Any]) -> str:
    """One output row as a line of strict JSON: a number in the echoed input that is not finite
    (NaN, Infinity: its row's error names the field when it is an input) is written as null,
    never as the bare NaN / Infinity tokens Python writes, which JSON readers refuse."""
    return json.dumps(_finite(row), ensure_ascii=False, default=str, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr when it is a terminal (elsewhere nothing: the CLI's summary line
    says what happened); yields the thread-safe `progress` callback for predict_rows."""
    from tqdm import tqdm

    lock = threading.Lock()
    with tqdm(total=total, desc=label, unit="row", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        def tick(n: int) -> None:
            with lock:
                bar.update(n)

        yield tick
