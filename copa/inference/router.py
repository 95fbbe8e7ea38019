"""One DSPy engine for every model copa's in-process engine can load, chosen by the LM's model id.

DSPy's weight optimizers hand back `lm.copy(model=<new id>)`: the copy keeps its engine and only
its model string changes. So the model string names the weights ("copa/<folder or hub id>",
with "@<tag>" when DSPy's response cache is on: a hash of the weights, as copa.inference.cache
does), and this engine sends each request to copa's batching engine for that model.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from dspy.lm15 import Request, Response, response_to_events

from copa.inference.engine import AsyncBatchingEngine, BatchingEngine, get_engine, release_model

PREFIX = "copa/"
_TAG = re.compile(r"@([0-9a-f]{16})$")


def model_id(model: str, tag: str | None = None) -> str:
    """The DSPy model string for a model folder or hub id (tagged: the response cache may key
    on it)."""
    return f"{PREFIX}{model}" + (f"@{tag[:16]}" if tag else "")


def is_copa_model(model: str) -> bool:
    return model.startswith(PREFIX) and len(model) > len(PREFIX)


def model_of(model: str) -> str:
    """The folder or hub id behind a model string ('copa/<model>[@tag]')."""
    if not is_copa_model(model):
        raise ValueError(f"{model!r} is not a copa model id: write '{PREFIX}<model folder or "
                         "hub id>', as copa.lm(...) makes it")
    return _TAG.sub("", model[len(PREFIX):])


class RoutingEngine:
    """DSPy 3.4 engine: each request runs on copa's BatchingEngine for the request's model
    (loaded on first use, once per process), with one set of engine settings."""

    def __init__(self, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 default_max_tokens: int = 64, prefix_cache: bool = True,
                 trust_remote_code: bool = False, precision: str = "fp32") -> None:
        self.settings = {"max_batch_size": int(max_batch_size),
                         "batch_wait_ms": float(batch_wait_ms),
                         "default_max_tokens": int(default_max_tokens),
                         "prefix_cache": bool(prefix_cache),
                         "trust_remote_code": bool(trust_remote_code),
                         "precision": str(precision)}

    def engine_for(self, model: str) -> BatchingEngine:
        return get_engine(model_of(model), **self.settings)

    def release(self, model: str) -> bool:
        """Unload the model behind a model string (the next request loads it again)."""
        return release_model(model_of(model))

    def complete(self, request: Request) -> Response:
        return self.engine_for(request.model).complete(request)

    def stream(self, request: Request) -> Iterator[Any]:
        return response_to_events(self.complete(request))

    def dump_state(self) -> dict[str, Any]:
        return dict(self.settings)

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> RoutingEngine:
        return cls(**state)

    # Optimizers deep-copy programs and their LMs; the engine holds no per-LM state.
    def __copy__(self) -> RoutingEngine:
        return self

    def __deepcopy__(self, memo: dict) -> RoutingEngine:
        return self


class AsyncRoutingEngine:
    """The async counterpart DSPy wants for `acall`: the same routing, awaiting the batcher."""

    def __init__(self, engine: RoutingEngine) -> None:
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        return await AsyncBatchingEngine(self.engine.engine_for(request.model)).complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncRoutingEngine:
        return cls(RoutingEngine.load_state(state))

    def __copy__(self) -> AsyncRoutingEngine:
        return self

    def __deepcopy__(self, memo: dict) -> AsyncRoutingEngine:
        return self
