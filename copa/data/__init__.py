"""Task data, one room: where rows come from (sources, loaders), how their columns become
signature fields (columns), how they split (splits), and which train rows go with which input
(retrieval for RAG passages, demos for training rows).

Light: nothing here imports torch, transformers, dspy or axolotl. The split API is re-exported
because almost every stage reads it.
"""

from copa.data.columns import Row, format_value
from copa.data.splits import Splits, load_splits, read_jsonl, write_jsonl

__all__ = ["Row", "Splits", "format_value", "load_splits", "read_jsonl",
           "write_jsonl"]
