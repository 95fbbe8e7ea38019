"""copa's in-process LM for DSPy: the engine API of DSPy 3.4 (`complete(Request) -> Response`)
on copa.inference.batcher's Batcher, one engine per model folder and setup in a process
(get_engine / make_lm), and the time limits `copa serve` puts on a request.

DSPy's Evaluate and optimizers call the LM from many threads, one request each; the batcher
decodes them together. Saved programs name `copa.inference.engine.BatchingEngine` (their LM's
engine class), so it stays here.

Imported only by the stages that need a model: torch, transformers and dspy load at import.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

# Before anything can import torch: see copa.inference.local for why batched matmuls need this.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import dspy  # noqa: E402
from dspy.lm15 import Message, Request, Response, Usage, response_to_events  # noqa: E402

from copa.inference.batcher import Batcher  # noqa: E402
from copa.inference.local import Chat, Generation, LocalModel  # noqa: E402
from copa.inference.packed import Sampling  # noqa: E402


class RequestTimeout(TimeoutError):
    """A request's time limit (time_limit) passed before its answer came."""


# When the current caller stops waiting (time.monotonic()); None: it waits as long as it takes.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("copa_deadline",
                                                                        default=None)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Engine calls made inside the block give up after `seconds` in all (RequestTimeout); a
    request still queued is withdrawn, so a caller that gave up costs the model nothing."""
    if seconds is None:
        yield
        return
    token = _DEADLINE.set(time.monotonic() + float(seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def wait_for(future: Future) -> Any:
    """The future's result, within the caller's time limit (RequestTimeout past it)."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return future.result()
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        started = not future.cancel()  # still queued: withdrawn; running: it finishes unread
        raise RequestTimeout("the request's time limit passed " + (
            "while the model answered it" if started else "before the model started on it")
        ) from None


class BatchingEngine(Batcher):
    """DSPy 3.4 engine (`complete(Request) -> Response`) on a Batcher: callers block in
    complete() while the batcher decodes their requests together.

    Requests with temperature 0 (or none) decode greedily; others sample with their temperature,
    top_p, top_k and seed. Without a seed, the k-th request for the same prompt gets a seed
    derived from the prompt and k: repeated requests (DSPy's rollouts, an optimizer's retries)
    get different samples, and a re-run in the same order gets the same ones.
    """

    def __init__(self, model: LocalModel, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 default_max_tokens: int = 64) -> None:
        self.default_max_tokens = int(default_max_tokens)
        self._draws: dict[str, int] = {}  # prompt digest -> unseeded samples drawn for it
        super().__init__(model, max_batch_size, batch_wait_ms)

    # --- DSPy engine API -------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        messages, max_tokens, stop = self._unpack(request)
        sampling = self.sampling_for(request, messages)
        gen = wait_for(self.submit(messages, max_tokens, stop, sampling))
        return _response(request, gen)

    def sampling_for(self, request: Request, messages: Chat) -> Sampling | None:
        """The request's sampling settings, or None for greedy decoding."""
        config = request.config
        if not config.temperature:
            return None
        seed = config.seed
        if seed is None:
            digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            with self._cond:
                draw = self._draws[digest] = self._draws.get(digest, -1) + 1
            seed = int(hashlib.sha256(f"{digest}:{draw}".encode()).hexdigest()[:15], 16)
        return Sampling(temperature=float(config.temperature), seed=int(seed),
                        top_p=config.top_p, top_k=config.top_k)

    def stream(self, request: Request) -> Iterator[Any]:
        # No token streaming: the whole answer arrives as one event sequence.
        return response_to_events(self.complete(request))

    def dump_state(self) -> dict[str, Any]:
        """Lets a program whose predictors hold this LM be saved (the engine is re-made on load)."""
        return {"model_path": self.model.path, "max_batch_size": self.max_batch_size,
                "batch_wait_ms": self.batch_wait_s * 1000.0,
                "default_max_tokens": self.default_max_tokens,
                "prefix_cache": getattr(self.model, "prefix_cache", True),
                "trust_remote_code": getattr(self.model, "trust_remote_code", False),
                "precision": getattr(self.model, "precision", "fp32")}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> BatchingEngine:
        return get_engine(state["model_path"], max_batch_size=state["max_batch_size"],
                          batch_wait_ms=state["batch_wait_ms"],
                          default_max_tokens=state.get("default_max_tokens", 64),
                          prefix_cache=state.get("prefix_cache", True),
                          trust_remote_code=state.get("trust_remote_code", False),
                          precision=state.get("precision", "fp32"))

    # Optimizers deep-copy programs and the LMs they hold; the engine (model, thread) is shared.
    def __copy__(self) -> BatchingEngine:
        return self

    def __deepcopy__(self, memo: dict) -> BatchingEngine:
        return self

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
        sampling = self.engine.sampling_for(request, messages)
        future = self.engine.submit(messages, max_tokens, stop, sampling)
        deadline = _DEADLINE.get()
        if deadline is None:
            gen = await asyncio.wrap_future(future)
        else:
            try:
                gen = await asyncio.wait_for(asyncio.wrap_future(future),
                                             max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeout("the request's time limit passed") from None
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
_ENGINES: dict[tuple[str, int, float, int, bool, bool, str], BatchingEngine] = {}
_MODELS: dict[tuple[str, bool, bool, str], LocalModel] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model_path: str, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
               default_max_tokens: int = 64, prefix_cache: bool = True,
               trust_remote_code: bool = False, precision: str = "fp32") -> BatchingEngine:
    """The process-wide engine for a model folder (the model itself is loaded once per folder
    and precision)."""
    path = str(model_path)
    key = (path, int(max_batch_size), float(batch_wait_ms), int(default_max_tokens),
           bool(prefix_cache), bool(trust_remote_code), str(precision))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None or not engine.alive:
            model_key = (path, bool(prefix_cache), bool(trust_remote_code), str(precision))
            model = _MODELS.get(model_key)
            if model is None:
                model = _MODELS[model_key] = LocalModel(
                    path, prefix_cache=prefix_cache, trust_remote_code=trust_remote_code,
                    precision=precision)
            engine = _ENGINES[key] = BatchingEngine(
                model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                default_max_tokens=default_max_tokens)
        return engine


def make_lm(model_path: str, name: str, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
            max_tokens: int = 64, prefix_cache: bool = True,
            cache_tag: str | None = None, trust_remote_code: bool = False,
            precision: str = "fp32") -> dspy.LM:
    """A dspy.LM ("local/<name>") on the local model at model_path (greedy unless a call asks
    for a temperature).

    DSPy's response cache keys on the LM's name, not on the weights behind it: it is used only
    with a cache_tag (a hash of the weights, see copa.inference.cache), which joins the name
    ("local/<name>@<tag>").
    """
    engine = get_engine(model_path, max_batch_size, batch_wait_ms, max_tokens, prefix_cache,
                        trust_remote_code, precision)
    model = f"local/{name}@{cache_tag}" if cache_tag else f"local/{name}"
    return dspy.LM(model, engine=engine, async_engine=AsyncBatchingEngine(engine),
                   cache=cache_tag is not None, max_tokens=max_tokens)


def release_model(model_path: str) -> bool:
    """Close every engine on a model folder and drop the loaded model (frees its memory); the
    next get_engine loads it again. False when nothing was loaded."""
    path = str(model_path)
    with _ENGINES_LOCK:
        keys = [key for key in _ENGINES if key[0] == path]
        engines = [_ENGINES.pop(key) for key in keys]
        models = [key for key in _MODELS if key[0] == path]
        for key in models:
            del _MODELS[key]
    for engine in engines:
        engine.close()
    return bool(engines or models)

def generated_tokens() -> int:
    """Answer tokens every engine of this process has generated so far."""
    with _ENGINES_LOCK:
        return sum(engine.generated_tokens for engine in _ENGINES.values())


def close_all() -> None:
    """Stop every engine's worker and drop the loaded models (frees their memory)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _MODELS.clear()
    for engine in engines:
        engine.close()
