"""Retrieval for RAG recipes (`retrieve:`): a BM25 index (the bm25s library) over a corpus of
passages. The render stage builds it once per run into the run directory (rendered/retriever/);
every later stage, and the program at inference, loads it from there.

Ranking is deterministic: documents with equal scores keep their corpus order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copa.data.loaders import is_squad, read_table, squad_paragraphs
from copa.files import atomic_dir, sha256_file

INDEX_DIR = "retriever"  # the index's folder in a run's rendered/ folder
PASSAGES_FILE = "passages.json"
META_FILE = "retriever.json"


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s  # lazy: only RAG recipes pay for it

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


@dataclass
class Retriever:
    """The k best passages for a query, by BM25 over a fixed corpus."""

    passages: list[str]
    k: int
    bm25: Any = field(repr=False)

    def search(self, query: str, k: int | None = None) -> list[str]:
        import numpy as np

        k = min(k or self.k, len(self.passages))
        tokens = _tokens([query])[0]
        scores = (self.bm25.get_scores(tokens) if tokens
                  else np.zeros(len(self.passages), dtype=np.float32))
        order = np.lexsort((np.arange(len(scores)), -scores))  # best first, ties by corpus order
        return [self.passages[i] for i in order[:k]]

    # DSPy deep-copies programs while optimizing; the index is shared, never copied.
    def __copy__(self) -> Retriever:
        return self

    def __deepcopy__(self, memo: dict) -> Retriever:
        return self


def build_retriever(passages: Sequence[str], k: int) -> Retriever:
    import bm25s

    if not passages:
        raise ValueError("the corpus has no passages")
    bm25 = bm25s.BM25()
    bm25.index(_tokens(passages), show_progress=False)
    return Retriever(passages=list(passages), k=k, bm25=bm25)


def corpus_passages(path: Path, fmt: str = "auto", text_column: str = "text",
                    max_mb: int = 512) -> list[str]:
    """A corpus file's passages: a SQuAD file's distinct paragraphs, or a table's text column
    (empty texts left out). Raises FileNotFoundError / ValueError with the cause."""
    if fmt == "squad" or (fmt == "auto" and path.suffix.lower() == ".json"):
        data = read_table(path, "json", max_mb)
        if fmt == "squad" or is_squad(data):
            return squad_paragraphs(data)
    rows = read_table(path, fmt, max_mb)
    if not rows:
        raise ValueError("the corpus has no rows")
    present = list(dict.fromkeys(k for row in rows for k in row))
    if text_column not in present:
        raise ValueError(f"no column '{text_column}' (retrieve.text_column); columns present: "
                         f"{', '.join(map(str, present))}")
    for n, row in enumerate(rows, 1):  # str() would make a list its Python repr
        if isinstance(row.get(text_column), (list, tuple, dict, set, bytes, bytearray)):
            raise ValueError(f"row {n} has a {type(row[text_column]).__name__} for "
                             f"'{text_column}', where a passage's text belongs")
    texts = [str(r.get(text_column) or "").strip() for r in rows]
    return [t for t in texts if t]


def corpus_identity(recipe: Any) -> dict[str, Any]:
    """What the index depends on: the corpus file's content and the retrieve settings."""
    section = recipe.retrieve
    path = recipe.resolve(section.corpus)
    return {"corpus": section.corpus, "sha256": sha256_file(path) if path.is_file() else None,
            "format": section.format, "text_column": section.text_column,
            "retriever": section.retriever}


def recipe_passages(recipe: Any) -> list[str]:
    section = recipe.retrieve
    return corpus_passages(recipe.resolve(section.corpus), section.format, section.text_column,
                           recipe.data.max_file_mb)


def save_retriever(retriever: Retriever, folder: Path, identity: dict[str, Any]) -> Path:
    """Write the index, its passages and what it was built from, as one folder (atomic)."""
    with atomic_dir(folder) as tmp:
        retriever.bm25.save(str(tmp), show_progress=False)
        (tmp / PASSAGES_FILE).write_text(json.dumps(retriever.passages, ensure_ascii=False),
                                         encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps({**identity, "passages": len(retriever.passages)},
                                                indent=2, sort_keys=True) + "\n")
    return Path(folder)


def load_retriever(folder: Path, k: int) -> Retriever:
    import bm25s

    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"no retrieval index in {folder}: run the render stage "
                                "(copa render / copa run) first")
    passages = json.loads((folder / PASSAGES_FILE).read_text(encoding="utf-8"))
    bm25 = bm25s.BM25.load(str(folder), show_progress=False)
    return Retriever(passages=passages, k=k, bm25=bm25)


def index_for(recipe: Any, folder: Path) -> Retriever:
    """The recipe's index in `folder`: loaded when it was built from this very corpus and
    settings, else built and saved there."""
    identity = corpus_identity(recipe)
    meta = Path(folder) / META_FILE
    if meta.is_file():
        saved = json.loads(meta.read_text())
        saved.pop("passages", None)
        if saved == identity:
            return load_retriever(folder, recipe.retrieve.k)
    retriever = build_retriever(recipe_passages(recipe), recipe.retrieve.k)
    save_retriever(retriever, folder, identity)
    return retriever


def query_field(recipe: Any) -> str:
    return recipe.retrieve.query or recipe.task.input_fields[0]


def with_passages(recipe: Any, retriever: Retriever, rows: Sequence[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Rows with the passages the retriever returns for their query: what the program sees at
    inference, so training rows and demos carry the same (not the gold) context."""
    name, query = recipe.retrieve.field, query_field(recipe)
    return [{name: retriever.search(str(row[query])), **row} for row in rows]
