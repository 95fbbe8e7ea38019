"""Text for one line of a report, a table cell or a message."""

from __future__ import annotations


def one_line(text: str, limit: int = 300) -> str:
    """text with its whitespace collapsed, cut to `limit` characters (ending in "…" when cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
