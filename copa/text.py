"""Text for one line of a report, a table cell or a message; and what is not text."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def one_line(text: str, limit: int = 300) -> str:
    """text with its whitespace collapsed, cut to `limit` characters (ending in "…" when cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# Everything str.splitlines() breaks a line at, as the escape that shows it.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def on_one_line(text: str) -> str:
    """text with every line break written as its escape ('\\n'): a user error stays one line
    even when it quotes a value that holds one (".1f\\n" in an exception's own text)."""
    return str(text).translate(_LINE_BREAKS)


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in text (half of a UTF-16 pair: a JSON or YAML "\\ud800" escape
    parses to one), or None. No file, tokenizer or UTF-8 text can hold it."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return found.group() if found else None
