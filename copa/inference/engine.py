"""Local HF causal LM behind DSPy's 3.4 engine API, with dynamic batching across threads.

DSPy's Evaluate and optimizers call the LM from many threads, one request each. On CPU a batch
of 8 greedy generations costs little more than one (measured 5.6x throughput), so a worker
thread gathers concurrent requests for a few milliseconds and runs them as one `generate`.

Imported only by the stages that need a model: torch, transformers and dspy load at import.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Before anything can import torch: see copa.inference.local for why batched matmuls need this.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import dspy  # noqa: E402
from dspy.lm15 import Message, Request, Response, Usage, response_to_events

from copa.inference.local import Chat, Generation, LocalModel, matmul_is_batch_invariant  # noqa: E402,F401
from copa.inference.packed import Sampling  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    messages: Chat
    max_tokens: int
    stop: list[str]
    sampling: Sampling | None = None
    future: Future = field(default_factory=Future)


class EngineClosed(RuntimeError):
    pass


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


def _fail(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:  # withdrawn by its caller meanwhile
        pass


class BatchingEngine:
    """DSPy 3.4 engine (`complete(Request) -> Response`) that batches concurrent callers.

    Callers block in complete(); one worker thread gathers requests, runs one generate and
    resolves each caller's Future. It waits for as many requests as were outstanding around
    the last batch (the callers it served come back with their next request), at most
    `max_batch_size`, and for no longer than `batch_wait_ms` or a tenth of the last generate,
    whichever is longer: on CPU a row more costs little, a batch less costs a whole generate.
    max_batch_size=1 gives plain one-at-a-time generation (for comparison).
    Requests with temperature 0 (or none) decode greedily; others sample with their temperature,
    top_p, top_k and seed. Without a seed, the k-th request for the same prompt gets a seed
    derived from the prompt and k: repeated requests (DSPy's rollouts, an optimizer's retries)
    get different samples, and a re-run in the same order gets the same ones.
    """

    MAX_WAIT_S = 0.25

    def __init__(self, model: LocalModel, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 default_max_tokens: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = max(0.0, float(batch_wait_ms)) / 1000.0
        self.default_max_tokens = int(default_max_tokens)
        # rows decoding together, one entry per generate call or per admission to continuous
        # decoding (then the requests in flight after it): shows batching happened
        self.batch_sizes: list[int] = []
        self.requests = 0  # requests taken to decode (not the sum of batch_sizes, which overlap)
        self._expected = self.max_batch_size  # callers to wait for (unknown at first: all)
        self._last_generate_s = 0.0
        self.generate_seconds = 0.0  # time spent generating: the rest of a run is callers' work
        self.generated_tokens = 0  # answer tokens generated (a report's tokens/s)
        self._queue: list[_Pending] = []
        self._draws: dict[str, int] = {}  # prompt digest -> unseeded samples drawn for it
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="copa-lm-batcher", daemon=True)
        self._worker.start()

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

    # --- batching ---------------------------------------------------------------------------

    def submit(self, messages: Chat, max_tokens: int, stop: Sequence[str] | None = None,
               sampling: Sampling | None = None) -> Future:
        """Queue one chat; the Future resolves to a Generation (or the generation's exception)."""
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        item = _Pending(list(messages), int(max_tokens), list(stop or []), sampling)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._queue = [i for i in self._queue if not i.future.cancelled()]
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
            # Wait a little for other threads' requests: they arrive milliseconds apart when an
            # evaluator fans out, and a fuller batch costs little more than a single row.
            wait = max(self.batch_wait_s, min(self.MAX_WAIT_S, 0.1 * self._last_generate_s))
            deadline = time.monotonic() + wait
            target = min(self.max_batch_size, self._expected)
            while len(self._queue) < target and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._queue[:self.max_batch_size]
            del self._queue[:self.max_batch_size]
            # Requests their callers withdrew (time limit passed) are dropped, not generated.
            return [b for b in batch if b.future.set_running_or_notify_cancel()]

    def _take_more(self, room: int) -> list[_Pending]:
        """Requests queued meanwhile, up to `room`, without waiting (decoding is under way);
        none once the engine is closing (the rows in flight still finish)."""
        with self._cond:
            if self._closed or room <= 0:
                return []
            batch = self._queue[:room]
            del self._queue[:room]
            return [b for b in batch if b.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                if not batch:
                    continue
                stream = getattr(self.model, "stream", None)
                stream = stream() if stream is not None else None
                if stream is None:  # a model without continuous decoding: the batch at once
                    self._generate(batch)
                else:
                    self._decode_continuously(stream, batch)
        finally:
            # Also reached if the worker dies: nobody may wait forever on a queued request.
            with self._cond:
                self._closed = True
                pending, self._queue = self._queue, []
            for item in pending:
                _fail(item.future, EngineClosed("the engine closed before this request ran"))

    def _decode_continuously(self, stream: Any, batch: list[_Pending]) -> None:
        """Continuous batching: decode step by step; between steps, requests that arrived
        join (up to max_batch_size in flight) and each finished one gets its answer at once,
        so short requests keep flowing past a long one. Runs until nothing is in flight."""
        inflight: dict[int, _Pending] = {}
        start = time.monotonic()
        most = 0
        try:
            while True:
                if batch:
                    self._admit(stream, batch, inflight)
                    most = max(most, len(inflight))
                if not inflight:
                    break
                ended = stream.step()
                with self._cond:
                    self.generated_tokens += sum(g.output_tokens for _, g in ended)
                for key, gen in ended:
                    inflight.pop(key).future.set_result(gen)
                batch = self._take_more(self.max_batch_size - len(inflight))
        except Exception:
            # A failed step cannot say whose request broke it: each request still in flight
            # runs again alone, so each caller gets its own result or its own exception.
            log.exception("continuous decoding failed; re-running its requests one by one")
            for item in [*inflight.values(), *batch]:
                if not item.future.done():
                    self._generate([item])
        except BaseException as exc:
            for item in [*inflight.values(), *batch]:
                _fail(item.future, exc)
            raise
        with self._cond:
            self._last_generate_s = time.monotonic() - start
            self.generate_seconds += self._last_generate_s
            self._expected = max(1, most, len(self._queue))

    def _admit(self, stream: Any, batch: list[_Pending], inflight: dict[int, _Pending]) -> None:
        """Start decoding `batch`; a request the model cannot take fails alone."""
        ready = []
        for item in batch:
            try:
                ready.append((item, stream.prepare(item.messages, item.max_tokens, item.stop,
                                                   item.sampling)))
            except Exception as exc:
                _fail(item.future, exc)
        if ready:
            keys = stream.add([prepared for _, prepared in ready])
            inflight.update(zip(keys, [item for item, _ in ready], strict=True))
            self.batch_sizes.append(len(inflight))
            self.requests += len(ready)
        batch.clear()

    def _generate(self, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        self.requests += len(batch)
        start = time.monotonic()
        try:
            gens = self.model.generate_detailed(
                [b.messages for b in batch], [b.max_tokens for b in batch], [b.stop for b in batch],
                [b.sampling for b in batch])
            with self._cond:
                self._last_generate_s = time.monotonic() - start
                self.generate_seconds += self._last_generate_s
                self.generated_tokens += sum(g.output_tokens for g in gens)
                self._expected = max(1, len(batch) + len(self._queue))
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
