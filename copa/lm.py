"""Local HF causal LM behind DSPy's 3.4 engine API, with dynamic batching across threads.

DSPy's Evaluate and optimizers call the LM from many threads, one request each. On CPU a batch
of 8 greedy generations costs little more than one (measured 5.6x throughput), so a worker
thread gathers concurrent requests for a few milliseconds and runs them as one `generate`.

Imported only by the stages that need a model: torch, transformers and dspy load at import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# MKL's float32 GEMM picks kernels by matrix size, so a row's result depends on how many rows
# share the call (a batch of 8 vs 1 differs by ~1e-5). Strict conditional-numerical-
# reproducibility mode makes every row's result independent of its batch mates; MKL reads this
# once, at its first call, so it must be set before torch does any math (hence before import).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import dspy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from dspy.lm15 import Message, Request, Response, Usage, response_to_events

Chat = list[dict[str, str]]
log = logging.getLogger(__name__)
ROWWISE_ATTENTION = "copa_rowwise_sdpa"


@dataclass(frozen=True)
class Generation:
    """One completion and what DSPy's Response needs besides the text."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length" (its max tokens reached)


class _PerRowStop(transformers.StoppingCriteria):
    """Marks each row done on eos, on its own max tokens, or when one of its stop strings shows.

    Returns a per-row bool tensor, so generate() pads finished rows and ends when all are done.
    It records where each row ended, so the caller cuts exactly there (not at the batch's end).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, max_new: Sequence[int],
                 stops: Sequence[Sequence[str]], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new = list(max_new)
        self.stops = [list(s) for s in stops]
        self.eos_ids = eos_ids
        self.ended_at: list[int | None] = [None] * len(self.max_new)
        self.reason: list[str] = ["length"] * len(self.max_new)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        n = new.shape[1]
        for i in range(new.shape[0]):
            if self.ended_at[i] is not None:
                continue
            if int(new[i, -1]) in self.eos_ids:
                self.ended_at[i], self.reason[i] = n, "stop"
            elif self.stops[i] and _find_stop(self._decode(new[i]), self.stops[i]) is not None:
                self.ended_at[i], self.reason[i] = n, "stop"
            elif n >= self.max_new[i]:
                self.ended_at[i] = n
        done = [end is not None for end in self.ended_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)


def _rowwise_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA run row by row on each row's real (non-padding) keys only.

    With left padding, batched SDPA reduces over the padded key range too: the masked keys add
    exact zeros, but the reduction's blocking and alignment shift, so a padded row's logits
    differ from the same prompt alone by ~1e-5, enough to flip a greedy near-tie. Cutting each
    row down to exactly what it would be alone makes the attention bitwise batch-invariant.
    The cost is one small SDPA call per row and layer.
    """
    bsz, _, q_len, kv_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    pads = _left_pads(attention_mask, bsz, kv_len)
    if pads is None:  # not a plain left-padded causal mask: standard SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for b, pad in enumerate(pads):
        q0 = max(0, pad - (kv_len - q_len))  # first query that is a real token
        # Contiguous copies: the kernel then sees the same memory layout alone or in a batch.
        q = query[b:b + 1, :, q0:].contiguous()
        k = key[b:b + 1, :, pad:].contiguous()
        v = value[b:b + 1, :, pad:].contiguous()
        ql, kl = q.shape[2], k.shape[2]
        mask = None
        if 1 < ql < kl:  # queries are the last ql of kl positions: causal with an offset
            mask = torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(kl - ql)
        row = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=1 < ql == kl, enable_gqa=gqa)
        rows.append(torch.nn.functional.pad(row, (0, 0, q0, 0)) if q0 else row)
    out = torch.cat(rows)
    return out.transpose(1, 2).contiguous(), None


def _left_pads(mask: torch.Tensor | None, bsz: int, kv_len: int) -> list[int] | None:
    """Each row's count of leading masked keys, or None when the mask is not left-padding+causal."""
    if mask is None:
        return [0] * bsz
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != kv_len:
        return None
    last = mask[:, 0, -1, :]  # the last query sees every real key of its row
    pads = (~last).int().cumprod(-1).sum(-1)  # leading False run
    if int(last.sum()) != int((kv_len - pads).sum()):  # holes after the padding: not ours
        return None
    return [int(p) for p in pads]


def _register_rowwise_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROWWISE_ATTENTION, _rowwise_sdpa)
    AttentionMaskInterface.register(ROWWISE_ATTENTION, sdpa_mask)


def matmul_is_batch_invariant() -> bool:
    """Whether a GEMM row's result is independent of its batch mates (MKL strict mode took)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    x = torch.randn(64, 512, generator=gen)
    full = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w), full[:m]) for m in (1, 3, 8))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text (OpenAI semantics: the stop is not returned)."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


class LocalModel:
    """A HF causal LM folder loaded once, generating greedily for a batch of chats."""

    def __init__(self, path: str, device: str | None = None) -> None:
        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Left padding: every row's last prompt token sits at the same position, where
        # generation continues; position ids come from the attention mask in generate().
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # fp32 and row-wise attention: a greedy answer must not depend on its batch mates.
        _register_rowwise_attention()
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32, attn_implementation=ROWWISE_ATTENTION)
            self.rowwise_attention = True
        except (ValueError, TypeError) as exc:  # an architecture without the attention interface
            log.warning("%s: row-wise attention unavailable (%s); batched greedy outputs may "
                        "differ from one-at-a-time ones on near-ties", self.path, exc)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32)
            self.rowwise_attention = False
        self.model.to(self.device).eval()
        mkl_strict = self.device == "cpu" and matmul_is_batch_invariant()
        # True when batched greedy outputs are bitwise those of one-at-a-time generation
        # (CPU only: cuBLAS picks kernels by batch size too).
        self.batch_invariant = self.rowwise_attention and mkl_strict
        if self.device == "cpu" and not mkl_strict:
            log.warning("MKL strict mode is off (torch did math before copa.lm was imported, or "
                        "MKL_CBWR was set otherwise): batched greedy outputs may differ from "
                        "one-at-a-time ones on near-ties. Export MKL_CBWR=AUTO,STRICT to fix.")
        self.eos_ids = self._end_ids()
        self._lock = threading.Lock()  # one generate at a time: torch already uses every core

    def _end_ids(self) -> set[int]:
        """Token ids that end an answer.

        A tokenizer converted from GGUF can name the wrong eos (SmolLM2's says <|im_start|>),
        while generation_config holds the real one; a chat template's end-of-turn marker ends a
        turn whatever either says.
        """
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        template = self.tokenizer.chat_template or ""
        for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
            if marker in template:
                tid = self.tokenizer.convert_tokens_to_ids(marker)
                if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                    ids.add(tid)
        return {int(i) for i in ids}

    def render(self, messages: Chat) -> str:
        """The prompt text for a chat, ending where the assistant's answer starts."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[Chat], max_new_tokens: list[int],
                 stop: list[list[str] | None]) -> list[str]:
        """Greedy completions for a batch of chats, each with its own max tokens and stops."""
        return [g.text for g in self.generate_detailed(prompts, max_new_tokens, stop)]

    def generate_detailed(self, prompts: list[Chat], max_new_tokens: list[int],
                          stop: list[list[str] | None]) -> list[Generation]:
        if not (len(prompts) == len(max_new_tokens) == len(stop)):
            raise ValueError("prompts, max_new_tokens and stop must have the same length")
        if not prompts:
            return []
        if any(int(m) < 1 for m in max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = [list(s or []) for s in stop]
        texts = [self.render(p) for p in prompts]
        # The chat template already holds the special tokens: add none twice.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        criteria = _PerRowStop(self.tokenizer, prompt_len, max_new_tokens, stops, self.eos_ids)
        # A fresh config, so sampling settings in the model's generation_config.json are not
        # merged in (they would warn with do_sample=False).
        config = transformers.GenerationConfig(
            max_new_tokens=max(max_new_tokens), do_sample=False, num_beams=1,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.tokenizer.pad_token_id)
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                **enc, generation_config=config,
                stopping_criteria=transformers.StoppingCriteriaList([criteria]))
        results = []
        for i in range(len(prompts)):
            end = criteria.ended_at[i]
            new = out[i, prompt_len:prompt_len + (end if end is not None else max_new_tokens[i])]
            n_out = int(new.shape[0])
            if n_out and int(new[-1]) in self.eos_ids:
                new = new[:-1]
            text = self.tokenizer.decode(new.tolist(), skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
            cut = _find_stop(text, stops[i])
            if cut is not None:
                text = text[:cut]
            results.append(Generation(
                text=text, prompt_tokens=int(enc["attention_mask"][i].sum()),
                output_tokens=n_out, finish_reason=criteria.reason[i]))
        return results


@dataclass
class _Pending:
    messages: Chat
    max_tokens: int
    stop: list[str]
    future: Future = field(default_factory=Future)


class EngineClosed(RuntimeError):
    pass


class BatchingEngine:
    """DSPy 3.4 engine (`complete(Request) -> Response`) that batches concurrent callers.

    Callers block in complete(); one worker thread gathers requests for up to `batch_wait_ms`
    after the first arrives (or until `max_batch_size`), runs one generate and resolves each
    caller's Future. max_batch_size=1 gives plain one-at-a-time generation (for comparison).
    Decoding is always greedy: temperature and other sampling settings are ignored.
    """

    def __init__(self, model: LocalModel, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 default_max_tokens: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = max(0.0, float(batch_wait_ms)) / 1000.0
        self.default_max_tokens = int(default_max_tokens)
        self.batch_sizes: list[int] = []  # one entry per generate call: shows batching happened
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="copa-lm-batcher", daemon=True)
        self._worker.start()

    # --- DSPy engine API -------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        messages, max_tokens, stop = self._unpack(request)
        gen = self.submit(messages, max_tokens, stop).result()
        return _response(request, gen)

    def stream(self, request: Request) -> Iterator[Any]:
        # No token streaming: the whole answer arrives as one event sequence.
        return response_to_events(self.complete(request))

    def dump_state(self) -> dict[str, Any]:
        """Lets a program whose predictors hold this LM be saved (the engine is re-made on load)."""
        return {"model_path": self.model.path, "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_s * 1000.0,
                "default_max_tokens": self.default_max_tokens}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> BatchingEngine:
        return get_engine(state["model_path"], max_batch_size=state["max_batch_size"],
                          batch_wait_ms=state["batch_wait_ms"],
                          default_max_tokens=state.get("default_max_tokens", 64))

    # Optimizers deep-copy programs and the LMs they hold; the engine (model, thread) is shared.
    def __copy__(self) -> BatchingEngine:
        return self

    def __deepcopy__(self, memo: dict) -> BatchingEngine:
        return self

    # --- batching ---------------------------------------------------------------------------

    def submit(self, messages: Chat, max_tokens: int, stop: Sequence[str] | None = None) -> Future:
        """Queue one chat; the Future resolves to a Generation (or the generation's exception)."""
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        item = _Pending(list(messages), int(max_tokens), list(stop or []))
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._queue.append(item)
            self._cond.notify_all()
        return item.future

    def close(self, wait: bool = True) -> None:
        """Stop the worker after the batch it is running; requests still queued fail with
        EngineClosed. wait=False returns without waiting for that batch to finish."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and self._worker is not threading.current_thread():
            self._worker.join()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Wait a little for other threads' requests: they arrive microseconds apart when an
            # evaluator fans out, and a fuller batch costs little more than a single row.
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._queue[:self.max_batch_size]
            del self._queue[:self.max_batch_size]
            return batch

    def _run(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                self._generate(batch)
        finally:
            # Also reached if the worker dies: nobody may wait forever on a queued request.
            with self._cond:
                self._closed = True
                pending, self._queue = self._queue, []
            for item in pending:
                item.future.set_exception(EngineClosed("the engine closed before this request ran"))

    def _generate(self, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            gens = self.model.generate_detailed(
                [b.messages for b in batch], [b.max_tokens for b in batch], [b.stop for b in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One bad request must not fail its batch mates: rerun them one by one, so each
            # caller gets its own result or its own exception.
            for item in batch:
                self._generate([item])
            return
        except BaseException as exc:
            for item in batch:
                item.future.set_exception(exc)
            raise
        for item, gen in zip(batch, gens, strict=True):
            item.future.set_result(gen)

    def _unpack(self, request: Request) -> tuple[Chat, int, list[str]]:
        messages: Chat = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(
                getattr(p, "text", "") for p in request.system)
            messages.append({"role": "system", "content": system})
        for m in request.messages:
            text = m.text
            if text is None:
                raise ValueError(f"only text messages are supported, got parts {m.parts!r}")
            messages.append({"role": m.role, "content": text})
        max_tokens = request.config.max_tokens or self.default_max_tokens
        return messages, max_tokens, list(request.config.stop or ())


class AsyncBatchingEngine:
    """The async counterpart DSPy wants for `acall` (async programs): awaits the same batcher."""

    def __init__(self, engine: BatchingEngine) -> None:
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        messages, max_tokens, stop = self.engine._unpack(request)
        gen = await asyncio.wrap_future(self.engine.submit(messages, max_tokens, stop))
        return _response(request, gen)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        pass  # the sync engine owns the worker; close_all() / engine.close() stop it

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncBatchingEngine:
        return cls(BatchingEngine.load_state(state))

    def __copy__(self) -> AsyncBatchingEngine:
        return self

    def __deepcopy__(self, memo: dict) -> AsyncBatchingEngine:
        return self


def _response(request: Request, gen: Generation) -> Response:
    usage = Usage(input_tokens=gen.prompt_tokens, output_tokens=gen.output_tokens,
                  total_tokens=gen.prompt_tokens + gen.output_tokens)
    return Response(id=None, model=request.model, message=Message.assistant(gen.text),
                    finish_reason=gen.finish_reason, usage=usage)


# One engine (one loaded model, one worker) per model folder and batching setup per process.
_ENGINES: dict[tuple[str, int, float, int], BatchingEngine] = {}
_MODELS: dict[str, LocalModel] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model_path: str, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
               default_max_tokens: int = 64) -> BatchingEngine:
    """The process-wide engine for a model folder (the model itself is loaded once per folder)."""
    path = str(model_path)
    key = (path, int(max_batch_size), float(batch_wait_ms), int(default_max_tokens))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None or not engine.alive:
            model = _MODELS.get(path)
            if model is None:
                model = _MODELS[path] = LocalModel(path)
            engine = _ENGINES[key] = BatchingEngine(
                model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                default_max_tokens=default_max_tokens)
        return engine


def make_lm(model_path: str, name: str, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
            max_tokens: int = 64) -> dspy.LM:
    """A dspy.LM ("local/<name>") generating greedily with the local model at model_path.

    cache=False: DSPy's response cache would key on the name, not on the weights behind it.
    """
    engine = get_engine(model_path, max_batch_size, batch_wait_ms, max_tokens)
    return dspy.LM(f"local/{name}", engine=engine, async_engine=AsyncBatchingEngine(engine),
                   cache=False, max_tokens=max_tokens)


def close_all() -> None:
    """Stop every engine's worker and drop the loaded models (frees their memory)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _MODELS.clear()
    for engine in engines:
        engine.close()
