"""The recipe's serving side: how copa reaches its models (`serve:`), the engine table, and the
served models an optimizer role (proposer, teacher) can name. Split from copa.recipe.schema,
which holds the rest of a recipe."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from copa.recipe.data_schema import Section

_Section = Section


@dataclass(frozen=True)
class Engine:
    """One `serve.engine`: how it starts (a "module:function" that copa.dspy.lms imports only
    when the engine starts, so this table stays light) and the serve: settings it reads (they
    become its starter's arguments)."""

    starts: str
    settings: tuple[str, ...]
    help: str
    in_process: bool = False  # its LMs outlive the block that made them (no server to stop)
    own_ids: bool = False  # a server you run: it knows models by its ids, never copa's folders


# The one engine table: the schema's choices, their validation and copa.dspy.lms's dispatch.
ENGINES: dict[str, Engine] = {
    "local": Engine("copa.dspy.lms:start_local",
                    ("max_batch_size", "batch_wait_ms", "prefix_cache", "precision",
                     "response_cache"),
                    "in-process batched engine", in_process=True),
    "vllm": Engine("copa.dspy.lms:start_server", (),
                   "copa starts vLLM (CUDA) on loopback, an OpenAI-compatible server"),
    "transformers": Engine("copa.dspy.lms:start_server", (),
                           "copa starts `transformers serve` on loopback (runs on CPU)"),
    "openai": Engine("copa.dspy.lms:start_users_server", ("api_base", "api_key", "model", "models"),
                     "a server you run (api_base)", own_ids=True),
}
EngineName = Literal[tuple(ENGINES)]  # type: ignore[valid-type]  # the schema's choices

# Settings another engine cannot honour silently, and why: a non-default value under an engine
# whose settings lack the key is an error. The local engine's tuning keys are left out: they stay
# in force for what runs on copa's engine under any serve.engine (a strategy's fine-tunes).
ENGINE_ONLY = {"precision": "serves in the dtype its server is started with",
               "models": "knows each arm's model itself"}


def engines_reading(key: str) -> list[str]:
    """The engines whose settings include a serve: key."""
    return [name for name, engine in ENGINES.items() if key in engine.settings]


def api_base_checked(value: str | None) -> str | None:
    """An OpenAI-compatible server's base URL: http(s)://host[:port][/path]; raises ValueError."""
    if value is None:
        return None
    parts = urllib.parse.urlsplit(value.strip())
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"{value!r} is not a server URL: write http://HOST:PORT/v1 (the address "
                         "of an OpenAI-compatible server)")
    return value.strip()


class ServedModel(_Section):
    """A model on an OpenAI-compatible server you run."""

    engine: Literal["openai"] = "openai"
    api_base: str
    model: str
    api_key: str = "copa"

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str) -> str | None:
        return api_base_checked(value)


# Who writes for the optimizer: "base" / "merged" (the run's models), a model alias, local
# folder, .gguf file or hub id, or a served model. None: the arm's own model.
ModelRef = str | ServedModel | None


class ServeModels(_Section):
    base: str | None = Field(None, description="The id your server serves the base model under.")
    merged: str | None = Field(None, description="The id your server serves the fine-tuned "
                               "(merged) model under.")


class ServeSection(_Section):
    engine: EngineName = Field(
        "local", description="; ".join(f"{name}: {e.help}" for name, e in ENGINES.items()) + ".")
    api_base: str | None = None
    api_key: str = "copa"
    model: str | None = Field(None, description="The model id your server serves (engine "
                              "'openai', no fine-tuned arms); copa-started servers know their "
                              "own.")
    models: ServeModels = Field(default_factory=ServeModels, description="engine 'openai': "
                                "each arm's model id, {base: ..., merged: ...}; needed when "
                                "fine-tuning.")
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    prefix_cache: bool = Field(True, description="local engine: compute the turns before a "
                               "prompt's last one (system turn, demos) once and reuse them.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="local engine: the dtype the model computes in. auto: bf16 on a GPU, "
        "fp32 on a CPU (copa.precision).")
    response_cache: bool = Field(True, description="local engine: keep DSPy's response cache "
                                 "in the run directory, keyed by the model weights' hash, so a "
                                 "re-run repeats no generation (greedy decoding is deterministic).")

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return api_base_checked(value)

    @field_validator("max_batch_size")
    @classmethod
    def _batch(cls, value: int) -> int:
        if not 1 <= value <= 1024:
            raise ValueError(f"must be a whole number from 1 to 1024 (got {value})")
        return value

    @field_validator("batch_wait_ms")
    @classmethod
    def _wait(cls, value: float) -> float:
        if not (math.isfinite(value) and 0 <= value <= 10_000):
            raise ValueError(f"must be a finite number in [0, 10000] ms (got {value!r})")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: ServeModels, info: Any) -> ServeModels:
        named = value.base is not None or value.merged is not None
        if named and info.data.get("model"):
            raise ValueError("write serve.models or serve.model, not both")
        return value

    @field_validator(*ENGINE_ONLY)
    @classmethod
    def _engine_only(cls, value: Any, info: Any) -> Any:
        engine, key = info.data.get("engine"), info.field_name
        if engine is None or key in ENGINES[engine].settings \
                or value == cls.model_fields[key].get_default(call_default_factory=True):
            return value
        only = " or ".join(f"'{name}'" for name in engines_reading(key))
        raise ValueError(f"only for engine {only}; engine '{engine}' {ENGINE_ONLY[key]}: "
                         f"remove serve.{key}")

    def model_for(self, role: str) -> str | None:
        """engine 'openai': the id the user's server knows the 'base' or 'merged' model by."""
        return getattr(self.models, role, None) or self.model

    @model_validator(mode="after")
    def _api_base(self) -> ServeSection:
        if self.engine == "openai" and not self.api_base:
            raise ValueError("engine 'openai' needs api_base, e.g. http://127.0.0.1:8000/v1")
        return self
