"""Packed decoding (greedy, or sampled per row): a batch of rows as one token sequence, no padding.

Each forward concatenates the rows' new tokens (a whole prompt's rest at first, then one token
per unfinished row) into a single [1, tokens] input. Linear layers see one matrix whose rows
MKL strict mode computes independently of each other; attention runs per row over that row's
own key/value buffer (rows of equal length in one call, as separate batch entries). So a row's
logits are bitwise those it gets alone, a finished row simply leaves the batch, and nothing is
spent on padding or on growing caches by concatenation.

The model sees a `PackedBatch` as its cache (`past_key_values`): each attention layer hands it
the new keys and values, and copa's attention function (ATTENTION, below) reads the
active batch to attend per row. Imported only where a model runs (torch at import).
"""

from __future__ import annotations

import contextvars
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [1, kv_heads, tokens, head_dim]

# The batch whose forward is running (None outside one): read by the attention function.
ACTIVE: contextvars.ContextVar[PackedBatch | None] = contextvars.ContextVar(
    "copa_packed_batch", default=None)
# create_causal_mask returns a 4-D mask as it is: this placeholder skips building a mask the
# per-row attention never reads.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next tokens when not greedily: temperature (> 0), nucleus (top_p)
    and top_k filters, and the seed of the row's own random stream. A row's stream belongs to
    it alone and its logits do not depend on its batch mates, so a seeded row samples the same
    tokens alone or in any batch."""

    temperature: float
    seed: int
    top_p: float | None = None
    top_k: int | None = None


@dataclass
class Row:
    """One prompt to continue: cached prefix keys/values per layer (maybe none), then tokens;
    sampling=None decodes greedily. `history`: the prefix's token ids, where drafts are also
    looked up (copa.inference.draft)."""

    tokens: list[int]
    max_new: int
    prefix: list[KV] = field(default_factory=list)
    sampling: Sampling | None = None
    history: Sequence[int] = ()

    @property
    def prefix_len(self) -> int:
        return self.prefix[0][0].shape[2] if self.prefix else 0

    @property
    def capacity(self) -> int:
        return self.prefix_len + len(self.tokens) + self.max_new


class PackedBatch:
    """Per-row key/value buffers, and which slice of the packed input belongs to which row.

    A row's buffer holds capacity = its own prompt + max new tokens, so its tensors have the
    same shape and strides whatever its batch mates are. Rows of equal capacity share one
    tensor (a row is one index of it), so rows that also have equal lengths, as templated
    prompts often do, attend in one call: SDPA computes each batch entry on its own.
    """

    def __init__(self, rows: Sequence[Row] = ()) -> None:
        # Everything is keyed by row or tensor id and dropped when its rows finish: a batch
        # that lives as long as a server's stream holds only the rows in flight (a finished
        # row's prefix keys and values, one per retrieved-demos prompt, would otherwise stay).
        self.rows: dict[int, Row] = {}
        self.lengths: dict[int, int] = {}  # tokens already in each row's buffer
        self.members: dict[int, list[int]] = {}  # shared tensor -> its rows
        self.slots: dict[int, tuple[int, int]] = {}  # row -> (shared tensor, index in it)
        self.live: dict[int, int] = {}  # shared tensor -> its rows still decoding
        # [layer][shared tensor], each made at its rows' first update, dropped once all left
        self.buffers: list[dict[int, KV]] = []
        # This forward's rows, as runs of consecutive rows that can attend in one call:
        # (start in packed input, tokens per row, keys per row after it, tensor, index, rows,
        # whether each token attends as a decode step of its own: see forward's `stepwise`).
        self.runs: list[tuple[int, int, int, int, int, int, bool]] = []
        self._next_row = 0
        self._next_tensor = 0
        self.add(rows)

    def add(self, rows: Sequence[Row]) -> list[int]:
        """Take in more rows (between forwards); returns their ids. Rows added together
        with equal capacity share a tensor; rows added later get tensors of their own."""
        classes: dict[int, int] = {}  # capacity -> id of the tensor its rows share
        added = []
        for row in rows:
            i = self._next_row
            self._next_row += 1
            self.rows[i] = row
            self.lengths[i] = row.prefix_len
            c = classes.get(row.capacity)
            if c is None:
                c = classes[row.capacity] = self._next_tensor
                self._next_tensor += 1
                self.members[c] = []
                self.live[c] = 0
            self.slots[i] = (c, len(self.members[c]))
            self.members[c].append(i)
            self.live[c] += 1
            added.append(i)
        return added

    def release(self, row: int) -> None:
        """A row has finished: it is forgotten, and once every row of its tensor has
        finished, the tensor is freed."""
        c, _ = self.slots.pop(row)
        del self.rows[row], self.lengths[row]
        self.live[c] -= 1
        if not self.live[c]:
            del self.live[c], self.members[c]
            for layer in self.buffers:
                layer.pop(c, None)

    # --- the cache protocol the model's attention layers call ------------------------------

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> KV:
        while len(self.buffers) <= layer_idx:
            self.buffers.append({})
        layer = self.buffers[layer_idx]
        for c, members in self.members.items():  # tensors of rows added since the last forward
            if c in layer:
                continue
            shape = (len(members), keys.shape[1], self.rows[members[0]].capacity,
                     keys.shape[3])
            dtype = buffer_dtype(keys)
            k, v = keys.new_empty(shape, dtype=dtype), values.new_empty(shape, dtype=dtype)
            for j, i in enumerate(members):
                row = self.rows[i]
                if row.prefix_len:
                    pk, pv = row.prefix[layer_idx]
                    k[j, :, :row.prefix_len] = pk[0]
                    v[j, :, :row.prefix_len] = pv[0]
            layer[c] = (k, v)
        for start, n, total, c, j, g, _ in self.runs:
            k, v = layer[c]
            k[j:j + g, :, total - n:total] = _rows_of(keys, start, n, g)
            v[j:j + g, :, total - n:total] = _rows_of(values, start, n, g)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths.values(), default=0)

    # --- attention, row by row --------------------------------------------------------------

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None,
               gqa: bool, window: int | None = None) -> torch.Tensor:
        """Attention output [1, tokens, heads, head_dim] for the packed query [1, heads,
        tokens, head_dim]: each row's queries against its own buffer, causally; a sliding-window
        layer (Gemma 3's local layers) sees only its last `window` keys, as transformers does."""
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
        layer = self.buffers[layer_idx]
        for start, n, total, c, j, g, stepwise in self.runs:
            k, v = layer[c]
            if (n == 1 or stepwise) and k.dtype == torch.float32:  # decode steps
                # each query on its own over the keys up to its position: the same call
                # alone, batched, or as one of a draft's positions
                for r in range(g):
                    for i in range(n):
                        at, end = start + r * n + i, total - n + i + 1
                        first = end - window if window is not None and end > window else 0
                        out[0, at] = one_query_attention(
                            query[0, :, at].float(), k[j + r, :, first:end],
                            v[j + r, :, first:end], scaling)
                continue
            q = _rows_of(query, start, n, g).contiguous()
            # a prefill attends in the model's dtype (bf16 keys kept in fp32 are exact copies)
            k, v = k[j:j + g, :, :total].to(q.dtype), v[j:j + g, :, :total].to(q.dtype)
            mask = None
            if window is not None and total > window:
                # query i sits at position total - n + i and sees keys in (it - window, it]
                mask = (torch.ones(n, total, dtype=torch.bool, device=q.device)
                        .tril(total - n).triu(total - n - window + 1))
            elif 1 < n < total:  # the queries are the last n of total positions
                mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask,
                scale=scaling, is_causal=mask is None and 1 < n == total, enable_gqa=gqa)
            out[0, start:start + g * n] = o.transpose(1, 2).reshape(g * n, o.shape[1],
                                                                     o.shape[3])
        return out

    def _plan(self, segments: list[tuple[int, int, int, bool]]) -> None:
        """Group this forward's rows (row, start, tokens, stepwise) into runs that attend in
        one call: consecutive in the packed input and in a shared tensor, with equal lengths."""
        self.runs = []
        for row, start, n, stepwise in segments:
            c, j = self.slots[row]
            total = self.lengths[row] + n
            if self.runs:
                r_start, r_n, r_total, r_c, r_j, g, r_step = self.runs[-1]
                if (r_n, r_total, r_c, r_j + g, r_step) == (n, total, c, j, stepwise) \
                        and r_start + g * r_n == start:
                    self.runs[-1] = (r_start, r_n, r_total, r_c, r_j, g + 1, r_step)
                    continue
            self.runs.append((start, n, total, c, j, 1, stepwise))

    # --- one forward --------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, feed: dict[int, list[int]],
                stepwise: Collection[int] = ()) -> torch.Tensor:
        """Run the rows in `feed` (row -> its new tokens) as one packed forward; returns the
        logits at each fed row's last token, in feed's order ([rows, vocab]), and for the rows
        in `stepwise` at every one of its tokens, each attending as a decode step of its own
        (a draft's positions: logits bitwise those of one token at a time)."""
        ids: list[int] = []
        positions: list[int] = []
        segments = []
        keep: list[int] = []
        for row, tokens in feed.items():
            start, n = len(ids), len(tokens)
            segments.append((row, start, n, row in stepwise))
            keep.extend(range(start, start + n) if row in stepwise else [start + n - 1])
            ids.extend(tokens)
            positions.extend(range(self.lengths[row], self.lengths[row] + n))
        self._plan(segments)
        device = next(model.parameters()).device
        last = torch.tensor(keep, device=device)
        token = ACTIVE.set(self)
        try:
            out = model(input_ids=torch.tensor([ids], device=device),
                        position_ids=torch.tensor([positions], device=device),
                        attention_mask=_NO_MASK.to(device), past_key_values=self,
                        use_cache=True, logits_to_keep=last)
        finally:
            ACTIVE.reset(token)
        for row, _, n, _ in segments:
            self.lengths[row] += n
        return out.logits[0]

    def rewind(self, row: int, n: int) -> None:
        """Forget a row's last n tokens (a draft's rejected positions): the next forward
        writes over their keys and values."""
        self.lengths[row] -= n

    def prefix_of(self, row: int) -> list[KV]:
        """A row's keys and values so far, copied out (to cache them as a prefix)."""
        n = self.lengths[row]
        c, j = self.slots[row]
        return [(layer[c][0][j:j + 1, :, :n].clone(), layer[c][1][j:j + 1, :, :n].clone())
                for layer in self.buffers]


def attends_stepwise(device: torch.device) -> bool:
    """Whether decode steps (and a draft's positions) on `device` attend query by query through
    one_query_attention, on float32 keys and values: on CPU. Elsewhere they go through SDPA."""
    return device.type == "cpu"


def buffer_dtype(keys: torch.Tensor) -> torch.dtype:
    """The dtype a row's keys and values are kept in: float32 where decode steps attend
    stepwise (CPU) whatever the model's (bf16 keys and values are exact in it), so they attend
    in float32 through two plain products (one_query_attention): SDPA's bf16 kernel for one
    query per row took half of a bf16 step at a 2k-token context (bench/decode.py, AMD Zen 4).
    Elsewhere, the model's."""
    return torch.float32 if attends_stepwise(keys.device) else keys.dtype


def one_query_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scaling: float | None) -> torch.Tensor:
    """Attention of one position's queries [heads, dim] over a row's keys and values
    [kv_heads, keys, dim] (all of them visible): [heads, dim].

    A decode step has one query row per head, where SDPA's CPU kernel ran at a third of memory
    speed over a long cache (bench/decode.py). Here it is two plain products and a softmax;
    query heads that share a key/value head (GQA) are grouped as the rows of one product
    instead of repeating the keys. fp32 only (a bf16 product would round the scores to bf16):
    a bf16 model's keys and values are kept in fp32 on CPU (buffer_dtype) and its query cast.
    """
    kv_heads, dim = keys.shape[0], keys.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    # query head h reads key/value head h // (heads / kv_heads), as transformers' repeat_kv
    q = (query * scale).view(kv_heads, -1, dim)
    weights = torch.bmm(q, keys.transpose(1, 2)).softmax(-1)
    return torch.bmm(weights, values).view(-1, dim)


def _rows_of(packed_states: torch.Tensor, start: int, n: int, g: int) -> torch.Tensor:
    """The g rows of n tokens each from `start` of packed [1, heads, tokens, dim] states, as a
    [g, heads, n, dim] view."""
    heads, dim = packed_states.shape[1], packed_states.shape[3]
    return packed_states[0, :, start:start + g * n].view(heads, g, n, dim).transpose(0, 1)


# The attention implementation's name in transformers' registry (LocalModel loads with it).
ATTENTION = "copa_rowwise_sdpa"


def _rowwise_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Inside a packed forward, attention row by row over each row's own keys, so a row's
    result is bitwise what it is alone; anywhere else (generate(), training), transformers'
    SDPA."""
    batch = ACTIVE.get()
    if batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return batch.attend(module.layer_idx, query, scaling, gqa, window), None


def register_attention() -> None:
    """Registers copa's per-row attention with transformers under ATTENTION (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _rowwise_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
