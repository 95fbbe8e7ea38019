"""Linear layers whose every row's result is independent of the other rows in the call.

Greedy batched decoding is only "the" answer if a row's logits do not depend on its batch mates.
Attention is already per row (.packed); this module covers the matrix products. A BLAS picks
its float32 GEMM kernel (and with it the order of the sums) by matrix size, so a row computed
with 3 others can differ in the last bit from the same row computed with 63 others. Products
run through one of two libraries torch ships, each under the same row rules:
- oneDNN's products on weights laid out once in its own format (`torch.ops.mkldnn`), tried
  first: for the one-row products of a long generation they stream the weights at memory
  speed where MKL's reached a quarter of it (AMD Zen 4, bench/decode.py); on Zen 4 only a
  single row takes another kernel, so "onednn-floor4" computes at least 4;
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
not assumed from the CPU's name. Layers that read the same input (q/k/v, gate/up) share one
product on their stacked weights (`SharedProduct`): fewer, larger products per decode step.
Imported only where a model runs (torch at import).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

ROW_BLOCK = 16  # rows per product in padded/blocked mode: 8-16 cost least (bench/inference)
# A product on a weight prepared once (as it is, transposed, packed for oneDNN): rows [n, in]
# to [n, out].
Product = Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]

# (first row, rows) slices compared against the same rows of one 160-row call: single rows and
# small groups (where BLAS libraries switch to GEMV or small-matrix kernels), odd offsets, groups
# that straddle a row block, and larger groups (where threading may split the work otherwise).
_PROBE_ROWS = 160
# The probe's huge input: its rounding error (2^-3 at 2^21 in fp32) exceeds a bf16 step of a
# typical sum, so a sum that takes it in another order shows through bf16's rounding too.
_HUGE = 2.0 ** 21
_PROBES = ((5, 1), (3, 5), (9, 13), (20, 40), (7, 64), (30, 100),
           *((0, rows) for rows in range(1, 18)))


@dataclass(frozen=True)
class Mode:
    """How a linear layer computes x @ weight.T (+ bias): a product on a weight prepared once
    when the mode is applied, after zero rows are appended to a call of fewer than `floor`
    rows or up to a multiple of `multiple` rows (so small calls take the kernel big ones do)."""

    prepare: Callable[[torch.Tensor], Any]
    product: Product
    floor: int = 1
    multiple: int = 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        """The product with the weight prepared on the spot (probes and tests; a model's
        layers keep theirs, see use())."""
        return self.apply(x, self.prepare(weight), bias)

    def apply(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        pad = max(self.floor - n, (-n) % self.multiple)
        if pad > 0:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        out = self.product(rows, prepared, bias)
        return out[:n].view(*x.shape[:-1], out.shape[-1])


def _as_is(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach()  # a plain tensor: an nn.Parameter kept on the layer would register


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().t().contiguous()


def _blocked_product(rows: torch.Tensor, weight_t: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Rows (a multiple of ROW_BLOCK) as a batch of [ROW_BLOCK, in] @ [in, out] products with
    the weight already transposed and contiguous: bmm over weight.t().expand() copied the whole
    weight on every call (a bf16 decode step spent ~95 % of its time there, bench/decode.py)."""
    blocks = rows.view(-1, ROW_BLOCK, rows.shape[1])
    out = torch.bmm(blocks, weight_t.expand(blocks.shape[0], -1, -1)).view(-1, weight_t.shape[1])
    return out if bias is None else out + bias


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's own layout, laid out once: a product then streams it at memory
    speed (F.linear through MKL read a one-row product's weights at ~1/4 of it on AMD Zen 4)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _onednn_product(rows: torch.Tensor, packed_weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed_weight, bias, "none", [], "")


_TORCH = (_as_is, torch.nn.functional.linear)
_ONEDNN = (_onednn_pack, _onednn_product)
# Every way a model's products may run, cheapest first (bench/decode.py); choose() takes the
# first whose rows are independent of their batch mates. oneDNN's pre-packed products come first
# (2-4x MKL's for one row on Zen 4, 1.2-2.5x for 64); "native" is the model's own nn.Linear (MKL
# in strict mode is row-independent on Intel); "blocked" needs nothing of the BLAS.
MODES: dict[str, Mode] = {
    "onednn": Mode(*_ONEDNN), "onednn-floor4": Mode(*_ONEDNN, floor=4),
    "onednn-floor8": Mode(*_ONEDNN, floor=8), "onednn-padded": Mode(*_ONEDNN, multiple=ROW_BLOCK),
    "native": Mode(*_TORCH), "floor4": Mode(*_TORCH, floor=4), "floor8": Mode(*_TORCH, floor=8),
    "padded": Mode(*_TORCH, multiple=ROW_BLOCK),
    "blocked": Mode(_transposed, _blocked_product, multiple=ROW_BLOCK)}


def rows_independent(mode: Mode, n_in: int, n_out: int,
                     dtype: torch.dtype = torch.float32, bias: bool = False) -> bool:
    """Whether `mode` gives every row of a [rows, n_in] @ [n_in, n_out] product (+ bias)
    bitwise the same result whatever rows share its call, checked in `dtype` (bf16 products
    take other kernels than fp32 ones) on data that shows a sum's order: plain random data hid
    it in bf16, whose rounding covers most reorderings (seen on Zen 4: the probe passed one-row
    kernels whose greedy answers then differed batched). Here some rows add and take away again
    a huge term (equal weight columns, inputs +L and -L), so the low bits of their sums depend
    on where the kernel adds the rest."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen)
    x = torch.randn(_PROBE_ROWS, n_in, generator=gen)
    half = n_in // 2
    pairs = max(1, min(8, half // 2))
    for j in range(pairs):  # a pair of columns in either half, so in different blocks of K
        first, second = j * (half // pairs), half + j * (half // pairs) + j % 3
        weight[:, second] = weight[:, first]
        x[j::pairs, first], x[j::pairs, second] = _HUGE, -_HUGE
    weight, x = weight.to(dtype), x.to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    with torch.inference_mode():
        try:
            prepared = mode.prepare(weight)  # laid out once, as a model's layer keeps it
            full = mode.apply(x, prepared, b)
            return all(torch.equal(mode.apply(x[s:s + m], prepared, b), full[s:s + m])
                       for s, m in _PROBES)
        except (RuntimeError, AttributeError, NotImplementedError):  # a kernel this build lacks
            return False


# Linear layers of one module that read the same input, as Llama, Qwen, Mistral and Gemma name
# them: use() computes each group as one product on their weights stacked, so a decode step
# streams a layer's weights in 4 products instead of 7 (bench/decode.py).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(model: torch.nn.Module) -> list[list[torch.nn.Linear]]:
    """The groups of SIBLINGS a model has as plain linear layers of one module that agree on
    input size, bias, dtype and device (so their weights stack into one)."""
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            layers = [vars(module)["_modules"].get(name) for name in names]
            if all(type(layer) is torch.nn.Linear for layer in layers) and len(
                    {(layer.in_features, layer.bias is not None, layer.weight.dtype,
                      layer.weight.device) for layer in layers}) == 1:
                groups.append(layers)
    return groups


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int, bool]]:
    """The distinct (in, out, has a bias) shapes of a model's products: each linear layer's,
    and each sibling group's stacked (a bias may be added inside the product, in another
    order)."""
    shapes = {(m.in_features, m.out_features, m.bias is not None)
              for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes |= {(group[0].in_features, sum(m.out_features for m in group),
                group[0].bias is not None) for group in sibling_groups(model)}
    return sorted(shapes)


def choose(shapes: Iterable[tuple[int, int, bool]],
           dtype: torch.dtype = torch.float32) -> str:
    """The first mode of MODES (cheapest first) that computes rows independently for every
    (in, out, bias) shape in `dtype`, or "none" (batched answers may then differ from
    one-at-a-time ones on near-ties)."""
    shapes = list(shapes)
    for name, mode in MODES.items():
        if all(rows_independent(mode, n_in, n_out, dtype, bias)
               for n_in, n_out, bias in shapes):
            return name
    return "none"


def _forward_prepared(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.copa_mode.apply(x, self.copa_prepared, self.bias)


class SharedProduct:
    """One product for sibling layers that read the same input (SIBLINGS): the first of them
    called on an input computes all their outputs; each other takes its columns when called on
    that same (unchanged) tensor, as transformers calls q, k and v on one hidden state in turn.
    Called on another input, a sibling computes anew, so the outputs are those of its input.
    Until every sibling has its output, one input and its outputs stay held (a forward that
    stops half-way leaves them to the next call)."""

    def __init__(self, mode: Mode, layers: list[torch.nn.Linear]) -> None:
        self.mode = mode
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = None if layers[0].bias is None else \
            torch.cat([layer.bias.detach() for layer in layers])
        self.prepared, self.bias = mode.prepare(weight), bias
        self.sizes = [layer.out_features for layer in layers]
        if mode.prepare is _as_is:
            # A mode that computes on the weights as they are: the layers' weights become views
            # of the stack, which is then their only copy (not a second one beside them).
            start = 0
            for layer in layers:
                end = start + layer.out_features
                layer.weight.data = weight[start:end]
                if bias is not None:
                    layer.bias.data = bias[start:end]
                start = end
        # (input, its outputs, siblings yet to take theirs), replaced as one: a forward on
        # another thread never reads a half-updated pair
        self.last: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = None

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        last = self.last
        if last is None or last[0] is not x or index not in last[2]:
            outputs = self.mode.apply(x, self.prepared, self.bias).split(self.sizes, -1)
            last = self.last = (x, outputs, set(range(len(self.sizes))))
        last[2].discard(index)
        if not last[2]:  # every sibling has its output: hold no activations between calls
            self.last = None
        return last[1][index].contiguous()


def _forward_shared(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.copa_shared.output(self.copa_index, x)


_ROUTED = ("forward", "copa_mode", "copa_prepared", "copa_shared", "copa_index")


def use(model: torch.nn.Module, mode: str) -> int:
    """Route every plain `nn.Linear` of the model through `mode`'s product ("native" restores
    the class's own forward); returns how many layers were routed. Sibling layers (SIBLINGS)
    share one product on their stacked weights. A layer keeps its weight as the mode prepares
    it (transposed or packed for oneDNN: one more copy of the weights, taken now, so weights
    changed later are not seen; modes that keep weights as they are make sibling weights views
    of their stack)."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # not quantized or LoRA subclasses
            for name in _ROUTED:
                vars(module).pop(name, None)
    if mode == "native":
        return count
    for group in sibling_groups(model):
        shared = SharedProduct(MODES[mode], group)
        for index, layer in enumerate(group):
            layer.copa_shared, layer.copa_index = shared, index
            layer.forward = types.MethodType(_forward_shared, layer)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            count += 1
            if "copa_shared" not in vars(module):
                module.copa_mode = MODES[mode]
                module.copa_prepared = MODES[mode].prepare(module.weight)
                module.forward = types.MethodType(_forward_prepared, module)
    return count
