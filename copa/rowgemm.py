"""Linear layers whose every row's result is independent of the other rows in the call.

Greedy batched decoding is only "the" answer if a row's logits do not depend on its batch mates.
Attention is already per row (copa.packed); this module covers the matrix products. A BLAS picks
its float32 GEMM kernel (and with it the order of the sums) by matrix size, so a row computed
with 3 others can differ in the last bit from the same row computed with 63 others:
- on Intel CPUs MKL's strict reproducibility mode (MKL_CBWR=AUTO,STRICT) rules this out, so
  the model's own `nn.Linear` is kept ("native");
- elsewhere (seen on AMD EPYC Zen 3 and Zen 5) it does not, and every linear layer runs as
  fixed-size row blocks instead ("blocked"): rows are padded to a multiple of ROW_BLOCK and
  computed as a batch of [ROW_BLOCK, in] @ [in, out] products, each of the same shape, so each
  row goes through the same kernel whatever else shares the call.

Which one a model gets is measured when it loads (`choose`), on the model's own layer shapes,
not assumed from the CPU's name. Imported only where a model runs (torch at import).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import torch

ROW_BLOCK = 16  # rows per GEMM in blocked mode: 8-16 cost least here (bench/inference)
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# (first row, rows) slices compared against the same rows of one 64-row call: single rows and
# small groups (where BLAS libraries switch to GEMV or small-matrix kernels), odd offsets, and
# groups that straddle a row block.
_PROBES = ((0, 1), (5, 1), (0, 2), (0, 3), (3, 5), (0, 8), (9, 13), (0, 17), (20, 40))


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) over any leading shape, as equal-shape row blocks (see module doc)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)
    n = rows.shape[0]
    pad = (-n) % ROW_BLOCK
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, n_in)])
    blocks = rows.view(-1, ROW_BLOCK, n_in)
    out = torch.bmm(blocks, weight.t().expand(blocks.shape[0], -1, -1)).view(-1, weight.shape[0])
    if pad:
        out = out[:n]
    if bias is not None:
        out = out + bias
    return out.view(*lead, weight.shape[0])


def rows_independent(linear: Linear, n_in: int, n_out: int) -> bool:
    """Whether `linear` gives every row of a [rows, n_in] @ [n_in, n_out] product bitwise the
    same result whatever rows share its call (checked on random data of that shape)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen)
    x = torch.randn(64, n_in, generator=gen)
    with torch.inference_mode():
        full = linear(x, weight, None)
        return all(torch.equal(linear(x[s:s + m], weight, None), full[s:s + m])
                   for s, m in _PROBES)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct (in, out) shapes of a model's linear layers."""
    return sorted({(m.in_features, m.out_features) for m in model.modules()
                   if isinstance(m, torch.nn.Linear)})


def choose(shapes: Iterable[tuple[int, int]]) -> str:
    """"native" when the BLAS already computes rows independently for every shape, else
    "blocked" when row blocks do, else "none" (batched answers may then differ on near-ties)."""
    shapes = list(shapes)
    for mode, linear in (("native", native_linear), ("blocked", blocked_linear)):
        if all(rows_independent(linear, n_in, n_out) for n_in, n_out in shapes):
            return mode
    return "none"


def _blocked_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return blocked_linear(x, self.weight, self.bias)


def use_blocked(model: torch.nn.Module) -> int:
    """Route every plain `nn.Linear` of the model through blocked_linear; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # not quantized or LoRA subclasses
            module.forward = types.MethodType(_blocked_forward, module)
            count += 1
    return count


def use_native(model: torch.nn.Module) -> None:
    """Undo use_blocked: every linear layer back to its class's own forward (for A/B timing)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            vars(module).pop("forward", None)
