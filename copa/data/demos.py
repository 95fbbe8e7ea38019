"""Which train rows a prompt shows as demos: per training row (finetune.demos as a
distribution) and per input at inference (the retrieved-demos program).

Both sides pick nearest rows with the same `DemoIndex` (BM25 over the input fields, bm25s), so
a model fine-tuned on retrieved demos is prompted with demos chosen the same way. Demos always
come from the train split; a training row never gets itself (or a copy of its inputs) as a demo.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from copa.data import Row

RETRIEVED_MARK = "copa_retrieved"  # a saved retrieved-demos program's settings and rows
_WORD = re.compile(r"\w+(?:\.\w+)*")  # "5.1" stays one token: numbers are values, not words


def row_tokens(row: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """A row's input fields as BM25 tokens. With several fields each token names its field
    ("petal_length=1.4"), so equal values in different fields do not match."""
    tokens = []
    for name in fields:
        for word in _WORD.findall(str(row.get(name, "")).lower()):
            tokens.append(f"{name}={word}" if len(fields) > 1 else word)
    return tokens


def _inputs_key(row: Mapping[str, Any], fields: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row.get(f)) for f in fields)


class BM25Similarity:
    """BM25 scores of the train rows' input fields against a query row (bm25s)."""

    def __init__(self, rows: Sequence[Row], fields: Sequence[str]):
        import bm25s  # lazy: only recipes with retrieved demos pay for it

        self.fields = list(fields)
        corpus = [row_tokens(r, self.fields) or ["<empty>"] for r in rows]
        self.size = len(corpus)
        self.bm25 = bm25s.BM25()
        self.bm25.index(corpus, show_progress=False)

    def scores(self, query: Mapping[str, Any]) -> Any:
        import numpy as np

        tokens = [t for t in row_tokens(query, self.fields) if t in self.bm25.vocab_dict]
        return (self.bm25.get_scores(tokens) if tokens
                else np.zeros(self.size, dtype=np.float32))


class DemoIndex:
    """The train rows, ranked by similarity of their input fields to a query row: BM25 by
    default, or any `similarity` with a scores(query) -> one score per row (the model's hidden
    states: copa.inference.embed). Ties keep the rows' order, so a ranking is deterministic."""

    def __init__(self, rows: Sequence[Row], fields: Sequence[str], similarity: Any = None):
        self.rows, self.fields = list(rows), list(fields)
        if not self.rows:
            raise ValueError("no train rows to draw demos from")
        self.similarity = similarity or BM25Similarity(self.rows, self.fields)

    def ranked(self, query: Mapping[str, Any]) -> list[int]:
        """Every row's index, most similar first."""
        import numpy as np

        scores = np.asarray(self.similarity.scores(query))
        return [int(i) for i in np.lexsort((np.arange(len(scores)), -scores))]

    def nearest(self, query: Mapping[str, Any], k: int, leave_out: int | None = None
                ) -> list[int]:
        """The k most similar rows (most similar first). For a training row (leave_out = its
        index) without itself and without any row whose inputs equal its own: a row is
        never its own demo."""
        ranked = self.ranked(query)
        if leave_out is not None:
            same = _inputs_key(query, self.fields)
            ranked = [i for i in ranked
                      if i != leave_out and _inputs_key(self.rows[i], self.fields) != same]
        return ranked[:k]

    # DSPy deep-copies programs; the index is shared, never copied.
    def __copy__(self) -> DemoIndex:
        return self

    def __deepcopy__(self, memo: dict) -> DemoIndex:
        return self


def row_rng(seed: int, i: int, split: str = "train") -> random.Random:
    """Row i's own random stream: a row's k and demos do not depend on the rows before it."""
    return random.Random(f"copa-demos:{seed}:{split}:{i}")


def draw_demos(targets: Sequence[Row], train: Sequence[Row], fields: Sequence[str],
               k: tuple[int, int], pick: str, seed: int, split: str = "train",
               index: DemoIndex | None = None) -> list[list[int]]:
    """For each target row, the indices (into `train`) of its demos: k drawn from [lo, hi]
    per row, then `random` other train rows or the `retrieved` nearest ones. With
    split="train" the targets are the train rows themselves and row i never gets row i."""
    lo, hi = k
    if pick == "retrieved" and index is None:
        index = DemoIndex(train, fields)
    out = []
    for i, row in enumerate(targets):
        rng = row_rng(seed, i, split)
        n = rng.randint(lo, hi)
        own = i if split == "train" else None
        if n == 0:
            out.append([])
        elif pick == "retrieved":
            assert index is not None
            out.append(index.nearest(row, n, leave_out=own))
        else:  # never the row itself, nor a copy of its inputs
            same = _inputs_key(row, fields) if own is not None else None
            pool = [j for j, other in enumerate(train)
                    if j != own and _inputs_key(other, fields) != same]
            out.append(rng.sample(pool, min(n, len(pool))))
    return out


def trains_with_demos(recipe: Any) -> bool:
    """Whether the fine-tune's rows carry demos copa put there (not BetterTogether's own):
    then a demo-free fine-tune is trained beside it, for a fair fine-tune-only arm."""
    ft = recipe.finetune
    if not ft.enabled:
        return False
    if recipe.optimize.order == "p->w":
        return True
    if ft.demos == "fixed":
        return ft.num_demos > 0
    return is_distribution(ft.demos)


def is_distribution(value: Any) -> bool:
    """finetune.demos given as {k: ..., pick: ...} (not one of its words)."""
    return not isinstance(value, str)
