"""The decode loop (copa.inference.decoder.Decoder, LocalModel.stream, the engine's continuous
batching): the same answers as the engine before it was rewritten for long generations
(tests/fixtures/decode_golden.json, recorded from the old code by make_decode_golden.py), alone,
batched and joining mid-flight; and short requests finish while a long one is still running."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import save_varied_llama

from copa.inference import decoder, packed
from copa.inference.engine import BatchingEngine
from copa.inference.local import LocalModel

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "decode_golden.json").read_text())
CASES = GOLDEN["cases"]


@pytest.fixture(scope="module")
def varied(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalModel:
    return LocalModel(str(save_varied_llama(tiny_model_dir, tmp_path_factory.mktemp("varied"),
                                            seed=0)))


def sampling_of(case: dict) -> packed.Sampling | None:
    return packed.Sampling(**case["sampling"]) if case["sampling"] else None


def rows_of(model: LocalModel, cases: list[dict]) -> list[packed.Row]:
    return [model._row(c["chat"], c["max_new"], sampling_of(c)) for c in cases]


def never_stop(model: LocalModel):
    return lambda row, new: model._stop_reason(new, [])


def test_golden_cases_are_sound() -> None:
    """The recorded answers are worth comparing against: long and short, greedy and sampled,
    and every greedy step far from a tie (so no CPU's rounding can flip it)."""
    names = [c["name"] for c in CASES]
    assert any(n.startswith("long") for n in names) and any(n.startswith("sampled") for n in names)
    assert max(len(c["ids"]) for c in CASES) >= 64
    assert all(c["min_margin"] > 1e-3 and c["teacher_forced_agrees"]
               for c in CASES if c["sampling"] is None)


def test_greedy_and_sampled_ids_are_the_previous_engines_alone_and_batched(
        varied: LocalModel) -> None:
    import torch

    with torch.inference_mode():
        alone = [decoder.decode(varied.model, rows_of(varied, [c]), never_stop(varied))[0][0]
                 for c in CASES]
        together = [new for new, _ in
                    decoder.decode(varied.model, rows_of(varied, CASES), never_stop(varied))]
    expected = [c["ids"] for c in CASES]
    assert alone == expected
    assert together == expected


def test_generations_are_the_previous_engines(varied: LocalModel) -> None:
    chats = [c["chat"] for c in CASES]
    gens = varied.generate_detailed(chats, [c["max_new"] for c in CASES], [None] * len(CASES),
                                    [sampling_of(c) for c in CASES])
    assert [[g.text, g.prompt_tokens, g.output_tokens, g.finish_reason] for g in gens] == \
        [c["generation"] for c in CASES]


def test_rows_joining_mid_flight_answer_as_alone(varied: LocalModel) -> None:
    """A stream admits rows between steps (continuous batching): each still gets exactly its
    recorded answer, and a finished row's key/value tensors are freed."""
    stream = varied.stream()
    assert stream is not None
    todo = list(enumerate(CASES))
    answers: dict[int, list] = {}
    keys: dict[int, int] = {}
    steps = 0
    while todo or len(stream):
        if todo and steps % 3 == 0:  # one or two new requests every third step
            take, todo = todo[:1 + steps % 2], todo[1 + steps % 2:]
            added = stream.add([stream.prepare(c["chat"], c["max_new"], None, sampling_of(c))
                                for _, c in take])
            keys.update(zip(added, [i for i, _ in take], strict=True))
        for key, gen in stream.step():
            answers[keys[key]] = [gen.text, gen.prompt_tokens, gen.output_tokens,
                                  gen.finish_reason]
        steps += 1
    assert [answers[i] for i in range(len(CASES))] == [c["generation"] for c in CASES]
    batch = stream.decoder.batch
    assert batch._next_tensor > 3  # the rows really joined at different steps
    assert not batch.rows and not batch.members  # every finished row forgotten
    assert not any(batch.buffers)  # every tensor freed


def test_a_finished_request_leaves_nothing_behind(varied: LocalModel) -> None:
    """A stream lives as long as its engine (a server, a whole study): a request that ended must
    not keep its prompt's keys and values. Prompts with retrieved demos each have their own
    cached prefix; when the stream kept every finished row, a 77-intent evaluation grew by
    gigabytes (its process was killed for memory)."""
    import gc
    import weakref

    import torch

    case = next(c for c in CASES if c["sampling"] is None)
    stream = varied.stream()
    assert stream is not None
    with torch.inference_mode():
        prepared = stream.prepare(case["chat"], 3)
        kv = varied._prefix_kv(tuple(varied._ids("a prefix only this request has")))
        prepared[0].prefix = kv  # as if its own demos had been computed for it
        gone = weakref.ref(kv[0][0])
        del kv
        varied.clear_prefix_cache()
        stream.add([prepared])
        del prepared
        while len(stream):
            stream.step()
    gc.collect()
    assert gone() is None


def test_short_requests_finish_while_a_long_one_runs(varied: LocalModel) -> None:
    """One long generation and short requests arriving while it runs (a MIPROv2 proposal
    next to an evaluation): every short one gets its answer before the long one ends."""
    long_case = max(CASES, key=lambda c: len(c["ids"]))
    shorts = [c for c in CASES if c["name"].startswith("short")]
    engine = BatchingEngine(varied, max_batch_size=4, batch_wait_ms=0)
    finished: list[str] = []
    lock = threading.Lock()

    def track(future, name: str):
        future.add_done_callback(lambda f: (lock.acquire(), finished.append(name),
                                            lock.release()))
        return future

    try:
        long_future = track(engine.submit(long_case["chat"], 400), "long")
        short_futures = []
        for c in shorts * 2:  # twelve requests, a few at a time, while the long one decodes
            while len(finished) < len(short_futures) - 2:
                time.sleep(0.005)
            short_futures.append(track(engine.submit(c["chat"], c["max_new"]), c["name"]))
        results = [f.result(timeout=120) for f in short_futures]
        long_result = long_future.result(timeout=120)
    finally:
        engine.close()
    assert finished[-1] == "long", finished
    assert long_result.output_tokens > len(long_case["ids"])  # it ran long (no early stop)
    assert [[g.text, g.prompt_tokens, g.output_tokens, g.finish_reason] for g in results] == \
        [c["generation"] for c in shorts * 2]
    assert max(engine.batch_sizes) > 1


def _old_blocked(x, weight, bias):
    """The blocked product as it was before issue 30 (bmm over weight.t().expand())."""
    import torch

    from copa.inference import rowgemm

    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    rows = torch.cat([rows, rows.new_zeros((-n) % rowgemm.ROW_BLOCK, rows.shape[1])])
    blocks = rows.view(-1, rowgemm.ROW_BLOCK, rows.shape[1])
    out = torch.bmm(blocks, weight.t().expand(blocks.shape[0], -1, -1))
    out = out.view(-1, weight.shape[0])[:n]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def test_blocked_products_keep_their_bits_with_a_kept_transposed_weight(
        varied: LocalModel) -> None:
    """The blocked mode (bf16 on this Intel CPU) keeps a transposed copy of each weight instead
    of re-laying it out on every call: the products are bitwise the old ones, in fp32 and bf16,
    and a model routed through it computes with that copy."""
    import torch

    from copa.inference import rowgemm

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(96, 40, generator=gen).to(dtype)
        bias = torch.randn(96, generator=gen).to(dtype)
        for rows in (1, 5, 17, 40):
            x = torch.randn(1, rows, 40, generator=gen).to(dtype)
            old = _old_blocked(x, weight, bias)
            assert torch.equal(rowgemm.MODES["blocked"](x, weight, bias), old)
            assert torch.equal(rowgemm.MODES["blocked"].apply(x, weight.t().contiguous(), bias),
                               old)
    model = varied.model
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 3, layer.in_features, generator=gen)
    try:
        # a mode that keeps the weight as it is keeps a plain tensor, not a second parameter,
        # so switching to another mode re-prepares the layer
        assert rowgemm.use(model, "floor4") > 0
        assert dict(layer.named_parameters()).keys() == {"weight"}
        assert rowgemm.use(model, "blocked") > 0
        assert layer.copa_prepared.shape == (layer.in_features, layer.out_features)
        assert layer.copa_prepared.is_contiguous()
        with torch.inference_mode():
            assert torch.equal(layer(x), _old_blocked(x, layer.weight, layer.bias))
    finally:
        rowgemm.use(model, varied.gemm)
    assert ("copa_prepared" in vars(layer)) == (varied.gemm != "native")


@pytest.mark.parametrize(("window", "dtype"), [(None, "float32"), (7, "float32"),
                                               (None, "bfloat16"), (7, "bfloat16")])
def test_decode_steps_attend_with_plain_products_as_sdpa_does(
        window: int | None, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step (one new query per row) attends through one_query_attention, not SDPA:
    per row, query heads grouped per key/value head (GQA), a sliding window as the last
    `window` keys; its output is SDPA's up to float rounding. A bf16 model's keys and values
    are kept in fp32 on CPU (exact copies), so its decode steps attend in fp32 too."""
    import torch

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, prompt = 6, 2, 8, 20

    def states(tokens: int, n_heads: int = kv_heads) -> torch.Tensor:
        return torch.randn(1, n_heads, tokens, dim, generator=gen).to(dtype)

    batch = packed.PackedBatch([packed.Row(tokens=[0] * prompt, max_new=2)] * 2)
    batch._plan([(0, 0, prompt, False), (1, prompt, prompt, False)])  # both prompts, one prefill
    prompt_keys = states(2 * prompt)
    batch.update(prompt_keys, states(2 * prompt), 0)
    assert batch.buffers[0][0][0].dtype == torch.float32
    assert torch.equal(batch.buffers[0][0][0][1, :, :prompt].to(dtype),
                       prompt_keys[0, :, prompt:])  # fp32 keeps bf16 keys exactly
    batch.lengths = {0: prompt, 1: prompt}
    batch._plan([(0, 0, 1, False), (1, 1, 1, False)])  # one decode step of both rows
    batch.update(states(2), states(2), 0)
    query = states(2, heads)

    def no_sdpa(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decode step went through SDPA")

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    out = batch.attend(0, query, 0.3, gqa=True, window=window)
    keys, values = batch.buffers[0][0]
    first = prompt + 1 - window if window else 0
    assert out.dtype == dtype
    for r in range(2):
        expected = sdpa(query[:, :, r:r + 1].float(), keys[r:r + 1, :, first:prompt + 1],
                        values[r:r + 1, :, first:prompt + 1], scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[0, r], expected[0, :, 0].to(dtype), atol=1e-6,
                                   rtol=1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("mode", ["onednn", "onednn-floor4", "onednn-floor8", "onednn-padded"])
def test_onednn_products_answer_as_the_previous_engine(varied: LocalModel, mode: str) -> None:
    """Products through oneDNN on weights packed once (copa.inference.rowgemm, tried first):
    the same values as a plain linear layer, the recorded greedy answers alone, and batched
    too wherever the load-time probe finds the mode's rows independent on this CPU."""
    import torch

    from copa.inference import rowgemm

    model = varied.model
    gen = torch.Generator().manual_seed(4)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 3, layer.in_features, generator=gen)
    greedy = [c for c in CASES if c["sampling"] is None]
    try:
        assert rowgemm.use(model, mode) > 0
        assert layer.copa_prepared.is_mkldnn  # the weight in oneDNN's layout, kept
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))
            alone = [decoder.decode(model, rows_of(varied, [c]), never_stop(varied))[0][0]
                     for c in greedy]
            together = [new for new, _ in
                        decoder.decode(model, rows_of(varied, greedy), never_stop(varied))]
    finally:
        rowgemm.use(model, varied.gemm)
    assert alone == [c["ids"] for c in greedy]
    if all(rowgemm.rows_independent(rowgemm.MODES[mode], n_in, n_out, bias=bias)
           for n_in, n_out, bias in rowgemm.linear_shapes(model)):
        assert together == alone


def test_sibling_layers_share_one_product(varied: LocalModel) -> None:
    """q/k/v (and gate/up) compute as one product on their stacked weights: one call gives all
    three their columns, the values of each layer's own product; a sibling called on another
    input computes anew; nothing is held once every sibling has its output; and the load-time
    probe checks the stacked shape too. (The golden tests above check the answers.)"""
    import torch

    from copa.inference import rowgemm

    model = varied.model
    attention = model.model.layers[0].self_attn
    siblings = [attention.q_proj, attention.k_proj, attention.v_proj]
    stacked = sum(layer.out_features for layer in siblings)
    mlp = model.model.layers[0].mlp
    shapes = rowgemm.linear_shapes(model)
    assert (attention.q_proj.in_features, stacked, attention.q_proj.bias is not None) in shapes
    assert (mlp.up_proj.in_features, 2 * mlp.up_proj.out_features, False) in shapes
    gen = torch.Generator().manual_seed(6)
    x, other = (torch.randn(1, 3, attention.q_proj.in_features, generator=gen)
                for _ in range(2))
    calls = []
    try:
        assert rowgemm.use(model, "floor4") > 0
        shared = attention.q_proj.copa_shared
        assert all(layer.copa_shared is shared for layer in siblings)
        assert mlp.gate_proj.copa_shared is mlp.up_proj.copa_shared is not shared
        # a mode that keeps weights as they are keeps one copy: the layers' are views of it
        assert all(layer.weight.untyped_storage().data_ptr()
                   == shared.prepared.untyped_storage().data_ptr() for layer in siblings)
        product = shared.mode.product

        def counted(*args: object) -> torch.Tensor:
            calls.append(1)
            return product(*args)

        shared.mode = rowgemm.Mode(shared.mode.prepare, counted, shared.mode.floor)
        with torch.inference_mode():
            q, k = attention.q_proj(x), attention.k_proj(x)
            assert len(calls) == 1
            k_other = attention.k_proj(other)  # another input: computed for it
            assert len(calls) == 2 and shared.last is not None
            v_other, q_other = attention.v_proj(other), attention.q_proj(other)
            assert len(calls) == 2 and shared.last is None  # all three had theirs
            v = attention.v_proj(x)
            assert len(calls) == 3
            for layer, got, got_other in zip(siblings, (q, k, v), (q_other, k_other, v_other),
                                             strict=True):
                torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight))
                torch.testing.assert_close(got_other,
                                           torch.nn.functional.linear(other, layer.weight))
                assert got.is_contiguous()
    finally:
        rowgemm.use(model, varied.gemm)
    assert "copa_shared" not in vars(attention.q_proj) or varied.gemm != "native"
