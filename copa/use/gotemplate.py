"""A renderer for the small part of Go's text/template that copa's Ollama TEMPLATE uses, so a
test (and `copa export --format gguf` itself) can see the exact text Ollama would send.

Supported: literal text; `{{ .Field }}` (on the current dot); `{{ if P }}`, `{{ else if P }}`,
`{{ else }}`, `{{ end }}`; `{{ range P }}` (dot = each element); `eq A B`; string literals;
and the trim markers `{{-` / `-}}` (they remove the adjacent whitespace, newlines included).
Anything else is refused (GoTemplateError), never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


class GoTemplateError(Exception):
    pass


@dataclass
class _Node:
    kind: str  # text, out, if, range
    value: Any = None  # text, or the pipeline words
    branches: list[tuple[list[str] | None, list[_Node]]] = field(default_factory=list)


def _lex(source: str) -> list[tuple[str, str]]:
    """[(kind, text)]: kind is "text" or "action"; trim markers applied to the text."""
    parts: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = source[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return [p for p in parts if p != ("text", "")]


def _parse(parts: list[tuple[str, str]], pos: int, stops: tuple[str, ...]
           ) -> tuple[list[_Node], int, str | None]:
    nodes: list[_Node] = []
    while pos < len(parts):
        kind, text = parts[pos]
        if kind == "text":
            nodes.append(_Node("text", text))
            pos += 1
            continue
        words = _TOKEN.findall(text)
        head = words[0] if words else ""
        if head in stops or (head == "else" and "else" in stops):
            return nodes, pos, text
        if head in ("if", "range"):
            node = _Node(head)
            condition: list[str] | None = words[1:]
            pos += 1
            while True:
                body, pos, stop = _parse(parts, pos, ("end", "else"))
                if stop is None:
                    raise GoTemplateError(f"unclosed {{{{ {head} }}}}")
                node.branches.append((condition, body))
                pos += 1
                stop_words = _TOKEN.findall(stop)
                if stop_words[0] == "end":
                    break
                if head == "range" and len(stop_words) > 1:
                    raise GoTemplateError("{{ else if }} inside range is not supported")
                condition = stop_words[2:] if stop_words[1:2] == ["if"] else None
                if len(stop_words) > 1 and stop_words[1] != "if":
                    raise GoTemplateError(f"unsupported action {{{{ {stop} }}}}")
            nodes.append(node)
            continue
        if head in ("end", "else", "with", "define", "template", "block"):
            raise GoTemplateError(f"unexpected or unsupported action {{{{ {text} }}}}")
        nodes.append(_Node("out", words))
        pos += 1
    return nodes, pos, None


def _arg(word: str, dot: Any) -> Any:
    if word.startswith('"'):
        return bytes(word[1:-1], "utf-8").decode("unicode_escape")
    if word == ".":
        return dot
    if word.startswith("."):
        value = dot
        for name in word[1:].split("."):
            value = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
        return value
    raise GoTemplateError(f"unsupported argument '{word}'")


def _pipe(words: Sequence[str], dot: Any) -> Any:
    if not words:
        raise GoTemplateError("empty action")
    if words[0] == "eq":
        if len(words) != 3:
            raise GoTemplateError("eq takes two arguments here")
        return _arg(words[1], dot) == _arg(words[2], dot)
    if len(words) != 1:
        raise GoTemplateError(f"unsupported pipeline '{' '.join(words)}'")
    return _arg(words[0], dot)


def _truthy(value: Any) -> bool:
    return bool(value)  # Go: false, 0, nil, "" and empty collections are false


def _run(nodes: list[_Node], dot: Any, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "out":
            value = _pipe(node.value, dot)
            out.append("" if value is None else str(value))
        elif node.kind == "if":
            for condition, body in node.branches:
                if condition is None or _truthy(_pipe(condition, dot)):
                    _run(body, dot, out)
                    break
        else:  # range
            (condition, body), *rest = node.branches
            items = list(_pipe(condition, dot) or [])
            for item in items:
                _run(body, item, out)
            if not items and rest:
                _run(rest[0][1], dot, out)


def render(template: str, values: Mapping[str, Any]) -> str:
    """The text Go's text/template would produce for `template` with data `values`."""
    nodes, pos, stop = _parse(_lex(template), 0, ())
    if stop is not None:
        raise GoTemplateError(f"unexpected {{{{ {stop} }}}}")
    out: list[str] = []
    _run(nodes, values, out)
    return "".join(out)
