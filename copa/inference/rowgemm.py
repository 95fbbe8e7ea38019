"""Linear layers whose every row's result is independent of the other rows in the call.

Greedy batched decoding is only "the" answer if a row's logits do not depend on its batch mates.
Attention is already per row (.packed); this module covers the matrix products. A BLAS picks
its float32 GEMM kernel (and with it the order of the sums) by matrix size, so a row computed
with 3 others can differ in the last bit from the same row computed with 63 others:
- on Intel CPUs MKL's strict reproducibility mode (MKL_CBWR=AUTO,STRICT) rules this out, so
  the model's own `nn.Linear` is kept ("native");
- elsewhere (seen on AMD EPYC) it does not. There, where only small products take other kernels
  (seen on Zen 3: 1-3 rows differ, 4 and more agree), a product of fewer rows than that gets
  zero rows up to the floor ("floor4"/"floor8": a decode step of one sequence costs 4 rows, not
  16), or rows are padded to a multiple of ROW_BLOCK and computed in one product ("padded",
  ~free for batches); where that is not enough, every linear layer
  runs as a batch of [ROW_BLOCK, in] @ [in, out] products, each of the same shape, so each row
  goes through the same kernel whatever else shares the call ("blocked", ~20% slower).

Which one a model gets is measured when it loads (`choose`), on the model's own layer shapes,
not assumed from the CPU's name. Imported only where a model runs (torch at import).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import torch

ROW_BLOCK = 16  # rows per product in padded/blocked mode: 8-16 cost least (bench/inference)
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# (first row, rows) slices compared against the same rows of one 160-row call: single rows and
# small groups (where BLAS libraries switch to GEMV or small-matrix kernels), odd offsets, groups
# that straddle a row block, and larger groups (where threading may split the work otherwise).
_PROBE_ROWS = 160
_PROBES = ((5, 1), (3, 5), (9, 13), (20, 40), (7, 64), (30, 100),
           *((0, rows) for rows in range(1, 18)))


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _pad_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [rows, in] with zero rows appended up to a multiple of ROW_BLOCK; the real count."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    pad = (-n) % ROW_BLOCK
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    return rows, n


def floored(floor: int) -> Linear:
    """x @ weight.T (+ bias) with at least `floor` rows in the product (zero rows appended to a
    smaller call), for BLAS libraries that take other kernels only for the smallest products."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n < floor:
            rows = torch.cat([rows, rows.new_zeros(floor - n, rows.shape[1])])
        out = torch.nn.functional.linear(rows, weight, bias)[:n]
        return out.view(*x.shape[:-1], weight.shape[0])

    return linear


def padded_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias), rows padded to a multiple of ROW_BLOCK, in one product."""
    rows, n = _pad_rows(x)
    out = torch.nn.functional.linear(rows, weight, bias)[:n]
    return out.view(*x.shape[:-1], weight.shape[0])


def blocked_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) over any leading shape, as equal-shape row blocks (see module doc)."""
    return blocked_linear_t(x, weight.t().contiguous(), bias)


def blocked_linear_t(x: torch.Tensor, weight_t: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """blocked_linear with the weight already transposed and contiguous ([in, out]): a model
    keeps that copy (use()), so no call re-lays its weight out. bmm over weight.t().expand()
    copied the whole weight on every call: a bf16 decode step of one sequence spent ~95 % of
    its time there (bench/decode.py's profile). Same products, bitwise the same rows."""
    rows, n = _pad_rows(x)
    blocks = rows.view(-1, ROW_BLOCK, rows.shape[1])
    out = torch.bmm(blocks, weight_t.expand(blocks.shape[0], -1, -1))
    out = out.view(-1, weight_t.shape[1])[:n]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight_t.shape[1])


def rows_independent(linear: Linear, n_in: int, n_out: int,
                     dtype: torch.dtype = torch.float32) -> bool:
    """Whether `linear` gives every row of a [rows, n_in] @ [n_in, n_out] product bitwise the
    same result whatever rows share its call (checked on random data of that shape and dtype:
    bf16 products take other kernels than fp32 ones)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen).to(dtype)
    x = torch.randn(_PROBE_ROWS, n_in, generator=gen).to(dtype)
    with torch.inference_mode():
        full = linear(x, weight, None)
        return all(torch.equal(linear(x[s:s + m], weight, None), full[s:s + m])
                   for s, m in _PROBES)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct (in, out) shapes of a model's linear layers."""
    return sorted({(m.in_features, m.out_features) for m in model.modules()
                   if isinstance(m, torch.nn.Linear)})


MODES: dict[str, Linear] = {"native": native_linear, "floor4": floored(4),
                            "floor8": floored(8), "padded": padded_linear,
                            "blocked": blocked_linear}  # cheapest first


def choose(shapes: Iterable[tuple[int, int]], dtype: torch.dtype = torch.float32) -> str:
    """The cheapest mode that computes rows independently for every shape (native, floor4,
    floor8, padded, blocked) in `dtype`, or "none" (batched answers may then differ from
    one-at-a-time ones on near-ties)."""
    shapes = list(shapes)
    for mode, linear in MODES.items():
        if all(rows_independent(linear, n_in, n_out, dtype) for n_in, n_out in shapes):
            return mode
    return "none"


def _forward_through(linear: Linear) -> Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    return forward


def _forward_blocked(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return blocked_linear_t(x, self.copa_weight_t, self.bias)


def use(model: torch.nn.Module, mode: str) -> int:
    """Route every plain `nn.Linear` of the model through `mode`'s product ("native" restores
    the class's own forward); returns how many layers were routed. "blocked" keeps a
    transposed copy of each weight (taken now: weights changed later are not seen)."""
    linear = MODES[mode]
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # not quantized or LoRA subclasses
            vars(module).pop("forward", None)
            vars(module).pop("copa_weight_t", None)
            if mode == "blocked":
                module.copa_weight_t = module.weight.detach().t().contiguous()
                module.forward = types.MethodType(_forward_blocked, module)
                count += 1
            elif mode != "native":
                module.forward = types.MethodType(_forward_through(linear), module)
                count += 1
    return count
