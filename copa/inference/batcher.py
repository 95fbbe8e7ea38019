"""The batcher under copa's DSPy engine: callers submit chats from many threads, one worker
thread decodes them together on a LocalModel and resolves each caller's Future.

On CPU a batch of 8 greedy generations costs little more than one (measured 5.6x throughput),
so the worker gathers concurrent requests for a few milliseconds, then decodes step by step
(continuous batching): requests that arrive meanwhile join at the next step and each leaves
with its answer as soon as it ends. Nothing here knows DSPy: copa.inference.engine speaks its
engine API on top.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from copa.inference.local import Chat, LocalModel
from copa.inference.packed import Sampling

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



def _fail(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:  # withdrawn by its caller meanwhile
        pass



class Batcher:
    """Batches concurrent callers' chats onto one model.

    One worker thread gathers requests, decodes them and resolves each caller's Future. It
    waits for as many requests as were outstanding around the last batch (the callers it
    served come back with their next request), at most `max_batch_size`, and for no longer than
    `batch_wait_ms` or a tenth of the last generate, whichever is longer: on CPU a row more
    costs little, a batch less costs a whole generate. max_batch_size=1 gives plain
    one-at-a-time generation (for comparison).
    """

    MAX_WAIT_S = 0.25

    def __init__(self, model: LocalModel, max_batch_size: int = 8,
                 batch_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = max(0.0, float(batch_wait_ms)) / 1000.0
        # rows decoding together, one entry per generate call or per admission to continuous
        # decoding (then the requests in flight after it): shows batching happened
        self.batch_sizes: list[int] = []
        self.requests = 0  # requests taken to decode (not the sum of batch_sizes, which overlap)
        self._expected = self.max_batch_size  # callers to wait for (unknown at first: all)
        self._last_generate_s = 0.0
        self.generate_seconds = 0.0  # time spent generating: the rest of a run is callers' work
        self.generated_tokens = 0  # answer tokens generated (a report's tokens/s)
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="copa-lm-batcher", daemon=True)
        self._worker.start()

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
