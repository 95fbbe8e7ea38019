"""copa.inference (engine, local): greedy batched generation equals one-at-a-time generation,
and the DSPy engine batches concurrent callers, hands each its own answer or its own exception,
and shuts down.

The model tests use the tiny random Llama (SmolLM2 tokenizer and chat template); the engine's
plumbing tests use a scripted stand-in model, so they assert behaviour, not model output.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest
from conftest import save_varied_llama
from dspy.lm15 import Message, Request

# MKL_CBWR itself is set by conftest, before any torch import
import copa.inference.engine as lm_mod
from copa.inference import packed
from copa.inference.batcher import EngineClosed
from copa.inference.engine import BatchingEngine
from copa.inference.local import Generation, LocalModel, matmul_is_batch_invariant

WORDS = "the a cat dog runs blue quickly seven over under house tree red green why how".split()


def prompt(i: int) -> list[dict[str, str]]:
    """Deterministic chats of 1 to ~40 words, so left padding differs a lot within a batch."""
    n = 1 + (i * 13) % 40
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))
    chat = [{"role": "user", "content": f"{i}: {words}"}]
    return [{"role": "system", "content": "Answer briefly."}, *chat] if i % 3 == 0 else chat


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_varied_llama(tiny_model_dir, tmp_path_factory.mktemp("varied-llama"), seed=0)


@pytest.fixture(scope="module")
def tiny(varied_model_dir: Path) -> LocalModel:
    return LocalModel(str(varied_model_dir))


@pytest.fixture
def fresh_engines() -> Iterator[None]:
    yield
    lm_mod.close_all()


# --- (a) batched == one at a time ------------------------------------------------------------

def test_batched_greedy_outputs_equal_one_at_a_time(tiny: LocalModel) -> None:
    n = 10
    prompts = [prompt(i) for i in range(n)]
    max_new = [3 + (i * 5) % 17 for i in range(n)]
    stops: list[list[str] | None] = [["e"] if i % 2 else None for i in range(n)]

    alone = [tiny.generate_detailed([p], [m], [s])[0] for p, m, s in zip(prompts, max_new, stops)]
    batched = tiny.generate_detailed(prompts, max_new, stops)

    assert [g.text for g in batched] == [g.text for g in alone]
    assert batched == alone  # token counts and finish reasons too
    for gen, m in zip(batched, max_new):
        assert 1 <= gen.output_tokens <= m
    # The prompts really give different answers, and some were cut by their stop string.
    assert len({g.text for g in batched}) > n // 2
    unstopped = tiny.generate(prompts, max_new, [None] * n)
    cut = [i for i in range(n) if stops[i] and batched[i].text != unstopped[i]]
    assert cut, "no stop string fired: the test would not check stops"
    for i in cut:
        assert "e" not in batched[i].text
        assert unstopped[i].startswith(batched[i].text)
        assert batched[i].finish_reason == "stop"
    assert all(batched[i].finish_reason == "length" for i in range(n) if not stops[i])


def test_batch_invariance_is_active(tiny: LocalModel) -> None:
    """Both halves of the fix are on: row-independent matrix products and per-row attention."""
    import torch

    from copa.inference import rowgemm

    assert tiny.rowwise_attention
    if tiny.device == "cpu":
        assert tiny.batch_invariant
        # The mode the model got is the cheapest (first in MODES) whose rows are independent
        # of their batch mates on this CPU, for every shape of the model's layers.
        shapes = rowgemm.linear_shapes(tiny.model)
        names = list(rowgemm.MODES)
        assert all(rowgemm.rows_independent(rowgemm.MODES[tiny.gemm], n_in, n_out, tiny.dtype,
                                            bias) for n_in, n_out, bias in shapes)
        for cheaper in names[:names.index(tiny.gemm)]:
            assert not all(rowgemm.rows_independent(rowgemm.MODES[cheaper], n_in, n_out,
                                                   tiny.dtype, bias)
                           for n_in, n_out, bias in shapes), cheaper
        if matmul_is_batch_invariant():  # MKL strict mode (Intel): the model's own layers do
            assert names.index(tiny.gemm) <= names.index("native")
        linears = [m for m in tiny.model.modules() if isinstance(m, torch.nn.Linear)]
        patched = ["forward" in vars(m) for m in linears]
        assert all(patched) if tiny.gemm != "native" else not any(patched)


def test_blocked_linear_rows_do_not_depend_on_their_batch_mates() -> None:
    """Blocked products (copa.inference.rowgemm), the mode that needs nothing of the BLAS: a
    row's result is bitwise the same alone, at any offset and in any group, on any CPU, and
    equal (to rounding) to a plain linear layer; the padded mode computes the same values."""
    import torch

    from copa.inference import rowgemm

    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(1, 70, 40, generator=gen)  # [batch, tokens, features], as a layer sees it
    blocked = rowgemm.MODES["blocked"]
    full = blocked(x, weight, bias)
    assert full.shape == (1, 70, 96)
    torch.testing.assert_close(full, torch.nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(rowgemm.MODES["padded"](x, weight, bias), full)
    for start, rows in [(0, 1), (7, 1), (3, 2), (0, 16), (15, 2), (9, 33), (1, 69)]:
        part = blocked(x[:, start:start + rows], weight, bias)
        assert torch.equal(part, full[:, start:start + rows]), (start, rows)
    assert rowgemm.rows_independent(blocked, 576, 1536)
    # A row floor computes the same values; below the floor a call keeps its own row count.
    floor4 = rowgemm.MODES["floor4"]
    torch.testing.assert_close(floor4(x, weight, bias), full)
    assert floor4(x[:, :2], weight, bias).shape == (1, 2, 96)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_probe_sees_a_one_row_kernel_that_sums_in_another_order(dtype: str) -> None:
    """A kernel that sums a single row in another order than it sums rows among others breaks
    batched == one-at-a-time answers. In bf16 the output's rounding hides most reorderings, so
    the probe passed such kernels on random data (Zen 4: SmolLM2's bf16 answers differed
    batched); its data now makes a sum's order show."""
    import torch

    from copa.inference import rowgemm

    blocked = rowgemm.MODES["blocked"]

    def product(rows, weight_t, bias):  # row-independent blocks; a lone row summed backwards
        if rows.shape[0] == 1:
            return blocked.apply(rows.flip(-1), weight_t.flip(0), bias)
        return blocked.apply(rows, weight_t, bias)

    dtype = getattr(torch, dtype)
    lone_row_reversed = rowgemm.Mode(blocked.prepare, product)
    assert not rowgemm.rows_independent(lone_row_reversed, 1536, 576, dtype)
    assert not rowgemm.rows_independent(lone_row_reversed, 1536, 576, dtype, bias=True)
    floored = rowgemm.Mode(blocked.prepare, product, floor=2)  # no call of one row left
    assert rowgemm.rows_independent(floored, 1536, 576, dtype, bias=True)


def test_chat_end_of_turn_ends_an_answer(tiny: LocalModel) -> None:
    # The GGUF tokenizer names <|im_start|> as eos; <|im_end|> must end a turn all the same.
    assert tiny.tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny.eos_ids


def test_an_answer_stops_where_the_models_context_ends(tiny: LocalModel) -> None:
    """The tiny model has 1024 positions: a prompt that fills them is refused (a ValueError
    naming the context), and one near the end gets only the room that is left, alone or
    batched, packed or through generate(), never positions the model never learned."""
    context = tiny.model.config.max_position_embeddings
    words = " ".join(WORDS * 80)
    long_chat = [{"role": "user", "content": words}]
    assert len(tiny.split_prompt(long_chat)[1]) > context
    with pytest.raises(ValueError, match=f"this model's context {context}"):
        tiny.generate_detailed([long_chat], [8], [None])
    near = [{"role": "user", "content": " ".join(words.split()[:context - 40])}]
    used = len(tiny._ids(tiny.render(near)))
    assert context - 64 < used < context
    for packed_decoding in (True, False):
        tiny.packed = packed_decoding
        try:
            gens = tiny.generate_detailed([near, prompt(1)], [64, 64], [None, None])
        finally:
            tiny.packed = True
        # this model writes on without an end (64 tokens where it has the room)
        assert (gens[0].output_tokens, gens[0].finish_reason) == (context - used, "length")
        assert gens[1].output_tokens == 64


# --- (a') the prefix cache: turns before the last are computed once --------------------------

SYSTEMS = ["Answer briefly.", "You name colours. Reply with one word only, please."]


def few_shot(i: int) -> list[dict[str, str]]:
    """Chats as a few-shot program sends them: a system turn and demo turns shared by many
    calls (two different programs here), then the call's own question; every 4th has none."""
    if i % 4 == 3:
        return prompt(i)[-1:]
    system = SYSTEMS[i % 2]
    demos = [{"role": "user", "content": "the red tree"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "a blue house"}, {"role": "assistant", "content": "blue"}]
    return [{"role": "system", "content": system}, *demos[:2 + 2 * (i % 2)], prompt(i)[-1]]


def test_prefix_cache_keeps_batched_outputs_equal_to_one_at_a_time(tiny: LocalModel) -> None:
    n = 12
    prompts = [few_shot(i) for i in range(n)]
    max_new = [4 + (i * 3) % 9 for i in range(n)]
    tiny.clear_prefix_cache()

    alone = [tiny.generate_detailed([p], [m], [None])[0] for p, m in zip(prompts, max_new)]
    batched = tiny.generate_detailed(prompts, max_new, [None] * n)

    assert batched == alone
    assert len({g.text for g in batched}) > n // 2
    prefixes = {tiny.split_prompt(p)[0] for p in prompts}
    assert len(prefixes - {()}) == 2  # two programs, each prefix cached once and reused
    assert len(tiny._prefixes) == 2 and tiny.prefix_stats["hits"] > 0
    # A prompt's token count includes its cached prefix.
    assert all(g.prompt_tokens == len(tiny._ids(tiny.render(p))) for g, p in zip(batched, prompts))


def test_a_bf16_models_cached_prefixes_are_kept_in_bf16(varied_model_dir: Path) -> None:
    """A bf16 model's keys and values are held in fp32 while decoding, exact copies of bf16
    values: its cached prefixes keep them in bf16 (half the bytes) and answer as no cache."""
    import torch

    cached = LocalModel(str(varied_model_dir), precision="bf16")
    uncached = LocalModel(str(varied_model_dir), precision="bf16", prefix_cache=False)
    prompts = [few_shot(i) for i in range(4)]
    answers = cached.generate_detailed(prompts, [12] * 4, [None] * 4)
    assert answers == uncached.generate_detailed(prompts, [12] * 4, [None] * 4)
    assert len(cached._prefixes) == 2
    assert all(k.dtype == v.dtype == torch.bfloat16
               for layers in cached._prefixes.values() for k, v in layers)


def test_prefix_is_the_turns_before_the_last(tiny: LocalModel) -> None:
    chat = few_shot(0)
    prefix, rest = tiny.split_prompt(chat)
    full = tiny._ids(tiny.render(chat))
    assert list(prefix) + rest == full
    head = tiny.tokenizer.decode(list(prefix))
    assert head.endswith("<|im_end|>\n") and "the red tree" in head
    assert chat[-1]["content"] not in head
    assert tiny.split_prompt(prompt(1))[0] == ()  # a single user turn: nothing to share


def test_cached_prefix_gives_the_logits_of_the_whole_prompt(tiny: LocalModel) -> None:
    """Keys and values computed once for the prefix, then the rest on top, give the next-token
    logits of the whole prompt run at once (up to float rounding)."""
    import torch

    chats = [few_shot(0), few_shot(4)]  # same program, questions of different lengths
    splits = [tiny.split_prompt(c) for c in chats]
    assert splits[0][0] == splits[1][0] and len(splits[0][1]) != len(splits[1][1])
    prefix = splits[0][0]
    kv = tiny._prefix_kv(prefix)
    rows = [packed.Row(tokens=rest, max_new=1, prefix=kv)
            for _, rest in splits]
    with torch.inference_mode():
        cached = packed.PackedBatch(rows).forward(tiny.model, {0: rows[0].tokens,
                                                               1: rows[1].tokens})
        for row, (_, rest) in enumerate(splits):
            whole = tiny.model(torch.tensor([[*prefix, *rest]])).logits[0, -1]
            torch.testing.assert_close(cached[row], whole, atol=1e-4, rtol=1e-4)


def test_a_rows_logits_in_a_pack_are_bitwise_its_logits_alone(tiny: LocalModel) -> None:
    """Packed decoding's guarantee, at the level of logits: rows of different lengths, with
    and without a cached prefix, prefill and then decode steps with a row dropping out."""
    import torch

    # Rows 1 and 2 are the same chat: equal lengths, so they attend in one call.
    chats = [few_shot(i) for i in (0, 1, 1, 2, 3, 4)]
    splits = [tiny.split_prompt(c) for c in chats]
    assert len({len(rest) for _, rest in splits}) > 2 and any(not p for p, _ in splits)

    def row(i: int) -> packed.Row:
        prefix, rest = splits[i]
        kv = tiny._prefix_kv(prefix) if prefix else []
        return packed.Row(tokens=rest, max_new=4, prefix=kv)

    def steps(batch: packed.PackedBatch, drop_first: bool) -> list[list[torch.Tensor]]:
        """Prefill, then two decode steps; with drop_first, row 0 leaves after the first."""
        seen: list[list[torch.Tensor]] = [[] for _ in batch.rows]
        feed = {k: r.tokens for k, r in batch.rows.items()}
        for step in range(3):
            logits = batch.forward(tiny.model, feed)
            for k, out in zip(feed, logits):
                seen[k].append(out)
            feed = {k: [int(out.argmax())] for k, out in zip(feed, logits)
                    if not (drop_first and step and k == 0)}
        return seen

    with torch.inference_mode():
        batch = packed.PackedBatch([row(i) for i in range(6)])
        together = steps(batch, drop_first=True)
        assert [len(t) for t in together] == [2, 3, 3, 3, 3, 3]
        assert any(g > 1 for *_, g, _ in batch.runs), "no rows attended together"
        for i in range(6):
            alone = steps(packed.PackedBatch([row(i)]), drop_first=False)[0]
            for a, b in zip(alone, together[i]):
                assert torch.equal(a, b), f"row {i} differs when packed with others"


def test_packed_decoding_answers_as_transformers_generate_does(tiny: LocalModel) -> None:
    """copa's decoding loop gives the answers of transformers' own generate(), one at a time."""
    prompts = [prompt(i) for i in range(6)]
    max_new = [6] * 6
    ours = tiny.generate_detailed(prompts, max_new, [None] * 6)
    tiny.packed = False  # the fallback: model.generate with standard attention
    try:
        theirs = [tiny.generate_detailed([p], [6], [None])[0] for p in prompts]
    finally:
        tiny.packed = True
    assert [g.text for g in ours] == [g.text for g in theirs]
    assert ours == theirs


def test_seeded_sampling_is_reproducible_alone_or_batched_and_differs_across_seeds(
        tiny: LocalModel) -> None:
    """Sampled rows: a seed gives the same answer alone and inside a batch of other rows
    (greedy and sampled mixed); other seeds give other answers; greedy rows stay greedy."""
    prompts = [prompt(i) for i in range(6)]
    n = len(prompts)
    seeded = [packed.Sampling(temperature=1.0, seed=s) for s in range(n)]
    mixed = [None if i % 3 == 0 else seeded[i] for i in range(n)]
    batched = tiny.generate_detailed(prompts, [12] * n, [None] * n, mixed)
    alone = [tiny.generate_detailed([p], [12], [None], [s])[0] for p, s in zip(prompts, mixed)]
    assert batched == alone
    greedy = tiny.generate_detailed(prompts, [12] * n, [None] * n)
    assert all(batched[i] == greedy[i] for i in range(n) if mixed[i] is None)
    # One prompt, eight seeds: sampling at temperature 1 really varies with the seed.
    again = [tiny.generate_detailed([prompts[1]], [12], [None],
                                    [packed.Sampling(temperature=1.0, seed=s)])[0].text
             for s in range(8)]
    assert len(set(again)) > 1
    assert again[1] == batched[1].text  # seed 1, as in the batch
    # top_k=1 leaves only the best token: sampling then is greedy decoding.
    top1 = tiny.generate_detailed(prompts[:2], [12, 12], [None, None],
                                  [packed.Sampling(temperature=1.0, seed=5, top_k=1)] * 2)
    assert [g.text for g in top1] == [g.text for g in greedy[:2]]


def test_unseeded_sampled_requests_through_dspy_differ_and_repeat_on_a_rerun(
        varied_model_dir: Path, fresh_engines: None) -> None:
    """DSPy asks for several samples of one prompt (rollouts): each call gets its own sample,
    and a fresh engine given the same calls in the same order gives the same samples."""

    def samples() -> list[str]:
        lm_mod.close_all()
        lm = lm_mod.make_lm(str(varied_model_dir), "varied", max_tokens=10)
        return [lm(messages=[{"role": "user", "content": "Say something."}], temperature=1.0,
                   rollout_id=k)[0] for k in range(4)]

    first = samples()
    assert len(set(first)) > 1
    assert samples() == first


def test_prefix_cache_stays_within_its_byte_budget(varied_model_dir: Path) -> None:
    model = LocalModel(str(varied_model_dir), prefix_cache_bytes=1)
    for i in range(3):
        model.generate([few_shot(i)], [2], [None])
    assert len(model._prefixes) == 1  # only the newest prefix is kept


# --- (b) many threads through dspy.LM ----------------------------------------------------------

def test_concurrent_dspy_calls_are_batched_and_each_gets_its_own_answer(
        varied_model_dir: Path, fresh_engines: None) -> None:
    n = 8
    expected = lm_mod.make_lm(str(varied_model_dir), "seq", max_batch_size=1, max_tokens=12)
    sequential = [expected(messages_request(expected, i)).text for i in range(n)]

    # A long window: the batch closes when all 8 have arrived, so it is full however slowly
    # the threads start (the test waits on arrivals, never on a clock).
    lm = lm_mod.make_lm(str(varied_model_dir), "batched", max_batch_size=n,
                        batch_wait_ms=60_000, max_tokens=12)
    start = threading.Barrier(n)

    def call(i: int) -> str:
        start.wait()
        return lm(messages_request(lm, i)).text

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(call, range(n)))

    assert answers == sequential
    assert len(set(answers)) > 1
    engine = lm.engine
    assert engine.requests == n
    assert max(engine.batch_sizes) > 1
    assert engine.model is expected.engine.model  # one model per folder, shared by both engines


def messages_request(lm: dspy.LM, i: int) -> Request:
    chat = prompt(i)
    system = chat[0]["content"] if chat[0]["role"] == "system" else None
    user = chat[-1]["content"]
    return Request(model=lm.model, messages=(Message.user(user),), system=system)


def test_make_lm_caches_one_engine_and_copies_share_it(
        tiny_model_dir: Path, fresh_engines: None) -> None:
    a = lm_mod.make_lm(str(tiny_model_dir), "a")
    b = lm_mod.make_lm(str(tiny_model_dir), "b")
    assert a.engine is b.engine
    # Optimizers deep-copy programs: the copy must reuse the engine, not clone a model + thread.
    assert copy.deepcopy(a).engine is a.engine
    engine = a.engine
    lm_mod.close_all()
    assert not engine.alive
    assert lm_mod.make_lm(str(tiny_model_dir), "a").engine is not engine


# --- engine plumbing with a scripted model ------------------------------------------------------

class ScriptedModel:
    """Stands in for LocalModel: answers from a function, records batches, can block or fail."""

    path = "scripted"

    def __init__(self, answer=lambda chat: "ok", gate: threading.Event | None = None) -> None:
        self.answer = answer
        self.gate = gate
        self.started = threading.Event()
        self.seen: list[list[list[dict[str, str]]]] = []

    def generate_detailed(self, prompts, max_new_tokens, stop, sampling=None) -> list[Generation]:
        self.seen.append(prompts)
        self.started.set()
        if self.gate is not None:
            self.gate.wait()
        return [Generation(self.answer(p), 1, 1, "stop") for p in prompts]


def test_predict_with_chat_adapter_goes_through_the_engine_without_warnings() -> None:
    model = ScriptedModel(lambda chat: "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]")
    engine = BatchingEngine(model)  # type: ignore[arg-type]
    try:
        lm = dspy.LM("local/scripted", engine=engine, cache=False, max_tokens=16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
                pred = dspy.Predict("question -> answer")(question="What is 2+2?")
        assert pred.answer == "4"
        chat = model.seen[-1][0]
        assert chat[0]["role"] == "system" and "answer" in chat[0]["content"]
        assert "What is 2+2?" in chat[-1]["content"]
        noisy = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
                 and "dspy" in str(w.filename) + str(w.message)]
        assert not noisy, [str(w.message) for w in noisy]
    finally:
        engine.close()


# --- (c) exceptions reach the caller ----------------------------------------------------------

def test_a_generation_error_reaches_its_caller_and_spares_its_batch_mates() -> None:
    def answer(chat):
        if "boom" in chat[-1]["content"]:
            raise RuntimeError("generation exploded")
        return chat[-1]["content"].upper()

    model = ScriptedModel(answer)
    engine = BatchingEngine(model, max_batch_size=3, batch_wait_ms=60_000)  # type: ignore[arg-type]
    try:
        futures = [engine.submit([{"role": "user", "content": c}], 4) for c in ("a", "boom", "c")]
        assert futures[0].result().text == "A"
        assert futures[2].result().text == "C"
        with pytest.raises(RuntimeError, match="generation exploded"):
            futures[1].result()
        assert engine.batch_sizes[0] == 3  # they did run together first

    finally:
        engine.close()

    # Through dspy.LM the caller gets DSPy's error, caused by the model's.
    engine = BatchingEngine(model, batch_wait_ms=0)  # type: ignore[arg-type]
    try:
        lm = dspy.LM("local/scripted", engine=engine, cache=False, max_tokens=4, num_retries=0)
        with pytest.raises(Exception, match="generation exploded") as info:
            lm(Request(model=lm.model, messages=(Message.user("boom"),)))
        chain, exc = [], info.value
        while exc is not None:
            chain.append(exc)
            exc = exc.__cause__
        assert any(isinstance(e, RuntimeError) and "exploded" in str(e) for e in chain)
        assert engine.alive  # the worker survives a failed batch
    finally:
        engine.close()


# --- (d) close --------------------------------------------------------------------------------

def test_close_stops_the_worker_and_fails_what_is_still_queued() -> None:
    gate = threading.Event()
    model = ScriptedModel(gate=gate)
    engine = BatchingEngine(model, max_batch_size=1)  # type: ignore[arg-type]
    running = engine.submit([{"role": "user", "content": "first"}], 4)
    model.started.wait()  # the worker is inside generate with the first request
    queued = engine.submit([{"role": "user", "content": "second"}], 4)

    engine.close(wait=False)
    gate.set()
    engine.close()

    assert running.result().text == "ok"  # the batch in flight finishes
    with pytest.raises(EngineClosed):
        queued.result()
    assert not engine.alive
    with pytest.raises(EngineClosed):
        engine.submit([{"role": "user", "content": "late"}], 4)
