"""Similarity by a model's own hidden states: the retrieved-demos program's `by: hidden`.

A row's vector is the mean over its tokens of the model's last hidden layer (the attention mask
keeps padding out), L2-normalized, so similarity is a dot product. The text embedded is the
row's input fields, one "field: value" line each, the same fields BM25 ranks on. The model is
loaded once per process and shared (an index is built per program copy's owner, not per call).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from copa.prompting import field_value

BATCH = 16  # rows per forward pass while indexing


def row_text(row: Mapping[str, Any], fields: Sequence[str]) -> str:
    return "\n".join(f"{name}: {field_value(row.get(name, ''))}" for name in fields)


class _Encoder:
    """A model's mean-pooled last hidden states, fp32, one forward at a time (a lock: DSPy
    scores a program from several threads)."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(list(texts[start:start + BATCH]), return_tensors="pt",
                                       padding=True, truncation=True, max_length=512)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@lru_cache(maxsize=2)
def encoder(model_path: str) -> _Encoder:
    return _Encoder(model_path)


class HiddenStateSimilarity:
    """Cosine similarity of a query row to the train rows in `model_path`'s hidden states
    (copa.data.demos.DemoIndex's `similarity`)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], fields: Sequence[str],
                 model_path: str):
        self.fields = list(fields)
        self.encoder = encoder(model_path)
        self.vectors = self.encoder.encode([row_text(r, self.fields) for r in rows])

    def scores(self, query: Mapping[str, Any]) -> np.ndarray:
        vector = self.encoder.encode([row_text(query, self.fields)])[0]
        return self.vectors @ vector
