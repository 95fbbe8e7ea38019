"""Reading data files into rows: flat tables (csv / jsonl / json / parquet), the nested and
derived formats copa knows (SQuAD, GSM8K), and a user's own loader ('package.module:function').

Light: no torch / dspy here (`copa validate` reads data through this module).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copa.files import jsonl_lines, missing_file_reason
from copa.registry import LOADERS, builtin
from copa.text import lone_surrogate
from copa.usercode import import_object

_CALCULATION = re.compile(r"<<[^<>]*>>")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # where json.loads may make one


class LoaderError(ValueError):
    """A user loader that cannot be imported, raised, or returned something other than rows."""


# A file's format by its extension, when none is set.
FORMATS = {"csv": "csv", "tsv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json",
           "parquet": "parquet"}


def read_table(path: Path, fmt: str = "auto", max_mb: int = 512,
               section: str | None = "data") -> list[dict[str, Any]]:
    """Rows of a csv / jsonl / json / parquet file as dicts. Raises ValueError with the cause.
    `section`: the recipe section whose keys (source, format, max_file_mb) the messages tell
    the user to set; None for a file named on the command line, which has no such keys."""
    reason = missing_file_reason(path)
    if reason == "no such file":
        raise FileNotFoundError(f"no such file: {path}")
    if reason:
        # the line names the key (data.source, data.test_source, retrieve.corpus) before this
        raise ValueError(f"{reason}; " + ("point it at a CSV, JSONL, JSON or Parquet file"
                                          if section else "give a data file"))
    size_mb = path.stat().st_size / 1e6
    if size_mb > max_mb:
        raise ValueError(f"file is {size_mb:.0f} MB, over " + (
            f"{section}.max_file_mb={max_mb}" if section else f"the limit of {max_mb} MB"))
    if fmt == "auto":
        fmt = FORMATS.get(path.suffix.lower().lstrip("."), "")
        if not fmt:
            exts = [f".{ext}" for ext in FORMATS]
            raise ValueError(f"cannot tell the format of '{path.name}': " + (
                f"set {section}.format" if section else "rename it to end in "
                f"{', '.join(exts[:-1])} or {exts[-1]}, whichever it holds"))
    if fmt == "parquet":
        import pyarrow.parquet as pq  # lazy: only parquet users pay for it

        _no_repeated_names(pq.read_schema(path).names, "")  # read_table: a many-line error
        return pq.read_table(path).to_pylist()
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ValueError("looks like a binary file, not text data")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    if fmt == "csv":
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        return _csv_rows(text, dialect)
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(jsonl_lines(text), 1):
            if line.strip():
                row = _json(line, f"line {n}: ")
                if not isinstance(row, dict):
                    raise ValueError(f"line {n}: each line must be a JSON object")
                rows.append(row)
        return rows
    data = _json(text, "")
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError("a JSON data file must be a list of objects")
    return data


def _no_repeated_names(names: list[str], where: str) -> None:
    """A table whose header names a column twice: a reader would keep one of them silently."""
    first: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if name in first:
            raise ValueError(f"{where}column {name!r} is named twice (columns "
                             f"{first[name]} and {n}): rename one")
        first[name] = n


def _csv_rows(text: str, dialect: str) -> list[dict[str, Any]]:
    """A CSV's rows as {header name: cell}; a repeated header name, or a row with more or fewer
    cells than the header, is a ValueError naming the row and its line. Blank lines are
    skipped (as csv.DictReader skips them). Rows may end in \n, \r\n or \r (an old Mac
    export): newline='' hands csv every ending as it is, as csv wants (a quoted cell keeps its
    own line breaks), where StringIO's default splits on \n only."""
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    rows: list[dict[str, Any]] = []
    done = 0  # the line the last row read ended on
    try:
        header = next(reader, None)
        if header is None:
            return rows
        done = reader.line_num
        _no_repeated_names(header, "line 1: ")
        for cells in reader:
            start, done = done + 1, reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"row {len(rows) + 1} (line {start}) has {len(cells)} "
                    f"cell{'s' * (len(cells) != 1)} where the header has {len(header)}: quote a "
                    "cell that holds the delimiter, and give every row every column")
            rows.append(dict(zip(header, cells, strict=True)))
    except csv.Error as exc:  # e.g. a field over csv's limit (131072 characters)
        raise ValueError(f"line {done + 1}: {exc}") from None
    return rows


class _RepeatedKey(ValueError):
    """An object that names a key twice (json.loads would keep the last value silently)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return row


def _json(text: str, where: str) -> Any:
    """json.loads with every failure a ValueError that says where and why in one line (deep
    nesting, over-long integers and an object naming a key twice included)."""
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        at = where or f"line {exc.lineno}: "
        raise ValueError(f"{at}invalid JSON ({exc.msg})") from None
    except _RepeatedKey as exc:
        raise ValueError(f"{where}an object names key {exc.args[0]!r} twice: keep one") from None
    except RecursionError:
        raise ValueError(f"{where}JSON nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ValueError(f"{where}{str(exc).split(';')[0]}") from None
    found = _SURROGATE_ESCAPE.search(text) and _lone_surrogate(data)
    if found:
        path, char = found
        raise ValueError(f"{where}{path}: a lone surrogate \\u{ord(char):04x} (half of a UTF-16 "
                         "pair) is not text: fix the \\u escape") from None
    return data


def _lone_surrogate(data: Any) -> tuple[str, str] | None:
    """(where, the character) of the first lone surrogate in parsed JSON's texts and keys, or
    None. A \\ud800 escape parses to one, which cannot be written out as UTF-8."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = lone_surrogate(value)
            if found:
                return path or "the text", found
        elif isinstance(value, dict):
            for key in value:
                found = lone_surrogate(key)
                if found:
                    return f"{path} key {ascii(key)}".lstrip(), found
            stack.extend((f"{path}.{key}" if path else key, item)
                         for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def is_squad(data: Any) -> bool:
    """A SQuAD-layout file: a list of articles, each with a list of paragraphs."""
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict)
            and isinstance(data[0].get("paragraphs"), list))


def _answer_texts(answers: Any, where: str) -> list[str]:
    if not isinstance(answers, list):
        raise ValueError(f"{where}.answers: must be a list of {{text: ...}}")
    texts = []
    for n, answer in enumerate(answers):
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}.answers[{n}]: needs a 'text'")
        texts.append(text)
    return list(dict.fromkeys(texts))  # annotators repeat answers: keep each once, in order


def squad_rows(articles: Any, impossible: str = "drop",
               impossible_answer: str = "unanswerable") -> list[dict[str, Any]]:
    """SQuAD layout (data[] -> paragraphs[] -> qas[]) -> one row per question, its paragraph as
    'context': {id, title, context, question, answer (the first gold answer), answers (every
    distinct gold answer), is_impossible}. SQuAD 2.0's unanswerable questions are dropped, or
    kept with `impossible_answer` as their one answer."""
    if isinstance(articles, Mapping):
        articles = articles.get("data")
    if not is_squad(articles):
        raise ValueError("not SQuAD layout: expected {data: [{title, paragraphs: [{context, "
                         "qas: [{question, answers: [{text}]}]}]}]}")
    rows: list[dict[str, Any]] = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise ValueError(f"data[{a}]: needs a 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context, questions = paragraph.get("context"), paragraph.get("qas")
            if not isinstance(context, str) or not isinstance(questions, list):
                raise ValueError(f"{where}: needs 'context' (text) and 'qas' (a list)")
            for q, qa in enumerate(questions):
                here = f"{where}.qas[{q}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{here}: needs a 'question'")
                answers = _answer_texts(qa.get("answers", []), here)
                unanswerable = bool(qa.get("is_impossible")) or not answers
                if unanswerable and not qa.get("is_impossible"):
                    raise ValueError(f"{here}: no answers, and not marked is_impossible")
                if unanswerable:
                    if impossible == "drop":
                        continue
                    answers = [impossible_answer]
                rows.append({"id": str(qa.get("id", f"{a}.{p}.{q}")),
                             "title": str(article.get("title", a)), "context": context,
                             "question": qa["question"], "answer": answers[0],
                             "answers": answers, "is_impossible": unanswerable})
    return rows


def squad_paragraphs(articles: Any) -> list[str]:
    """Every distinct paragraph of a SQuAD-layout file, in file order (a retrieval corpus)."""
    if isinstance(articles, Mapping):
        articles = articles.get("data")
    if not is_squad(articles):
        raise ValueError("not SQuAD layout: expected {data: [{paragraphs: [{context}]}]}")
    contexts = [p.get("context") for article in articles for p in article["paragraphs"]]
    if not all(isinstance(c, str) for c in contexts):
        raise ValueError("a paragraph lacks its 'context' text")
    return list(dict.fromkeys(contexts))


def gsm8k_rows(rows: list[dict[str, Any]], calculations: str = "strip") -> list[dict[str, Any]]:
    """GSM8K rows {question, answer: worked solution ending '#### N'} -> {question, reasoning:
    the solution, answer: N}: chain_of_thought trains on the solution as its reasoning and is
    graded on the number. `calculations: strip` drops the <<a*b=c>> calculator annotations."""
    out = []
    for n, row in enumerate(rows, 1):
        solution = row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(solution, str):
            raise ValueError(f"row {n}: needs 'question' and 'answer' text")
        if "####" not in solution:
            raise ValueError(f"row {n}: its answer has no '#### <number>' line")
        reasoning, _, number = solution.rpartition("####")
        if calculations == "strip":
            reasoning = _CALCULATION.sub("", reasoning)
        out.append({**row, "reasoning": reasoning.strip(),
                    "answer": number.strip().replace(",", "")})
    return out


def load_rows(path: Path, *, fmt: str = "auto", max_mb: int = 512, loader: str | None = None,
              options: Mapping[str, Any] | None = None,
              base_dir: Path | None = None) -> list[dict[str, Any]]:
    """Rows of a data file, through the recipe's loader (None: a flat table; a built-in one by
    its entry in copa.registry.LOADERS). Raises FileNotFoundError or ValueError with the cause."""
    options = dict(options or {})
    if loader is None:
        return read_table(path, fmt, max_mb)
    entry = LOADERS.get(loader)
    if entry is not None:
        reads = entry.reads if fmt == "auto" and entry.reads else fmt
        return builtin(entry.function)(read_table(path, reads, max_mb), **options)
    try:
        function = import_object(loader, base_dir)
    except ImportError as exc:
        raise LoaderError(f"cannot import {loader!r}: {exc}; name a function "
                          "loader(path, **loader_options) -> list of dicts") from None
    try:
        rows = list(function(path, **options))
    except Exception as exc:  # the user's loader failed: say whose and how
        raise LoaderError(f"{loader} raised {type(exc).__name__}: {exc}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise LoaderError(f"{loader} must return dicts (row {bad} is a "
                          f"{type(rows[bad]).__name__})")
    return [dict(r) for r in rows]
