"""The one place that turns a recipe's `serve:` settings, and a role, into a dspy.LM.

Roles: an arm's model (`model_lm`: base, merged, ... on serve.engine), an optimizer's proposer
or teacher (`role_lm`: optimize.proposer / teacher), and the fine-tunable model copa.lm() and
a strategy's BetterTogether train (`routing_lm`, with copa.provider's Provider). The engine
table is copa.recipe.serve_schema.ENGINES: its names and settings are what validation reads,
and each entry's `starts` names one of the starters below (imported by its dotted path).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import dspy

from copa.recipe import Recipe
from copa.recipe.serve_schema import ENGINES, ModelRef, ServedModel

Emit = Callable[[str], None]
Starter = Callable[..., AbstractContextManager[dspy.LM]]


def engine_settings(recipe: Recipe, engine: str | None = None) -> dict[str, Any]:
    """The serve: settings an engine reads (the recipe's own engine unless named)."""
    return {key: getattr(recipe.serve, key) for key in ENGINES[engine or recipe.serve.engine]
            .settings}


def local_engine_args(recipe: Recipe) -> dict[str, Any]:
    """serve: as copa's in-process engine's arguments (a BatchingEngine or a RoutingEngine);
    the response cache is not an engine argument (see response_cache_tag)."""
    args = engine_settings(recipe, "local")
    args.pop("response_cache")
    return {**args, "trust_remote_code": recipe.model.trust_remote_code}


_UNCACHED_SAID: set[str] = set()  # models already reported as not cached, said once each


def response_cache_tag(recipe: Recipe, model_path: str, run_dir: Path,
                       emit: Emit = print) -> str | None:
    """The one response-cache set-up: DSPy's cache goes to run_dir/cache, and the LM's name
    carries a hash of the weights it answers with (None: nothing identifies them, so nothing
    is cached)."""
    from copa.inference.cache import use_response_cache, weights_tag

    use_response_cache(run_dir / "cache" / "dspy")
    tag = weights_tag(model_path, fingerprints(run_dir), recipe.serve.precision)
    if tag is None and model_path not in _UNCACHED_SAID:
        _UNCACHED_SAID.add(model_path)
        emit(f"  response cache off for {model_path}: nothing identifies its weights "
             "(not a local folder, not in the local hub cache)")
    return tag


def fingerprints(run_dir: Path) -> Path:
    """Where a run directory remembers the weights' hashes (the response cache's keys)."""
    return run_dir / "cache" / "fingerprints.json"


def local_lm(recipe: Recipe, model_path: str, name: str, max_tokens: int,
             cache_tag: str | None = None) -> dspy.LM:
    """A dspy.LM on copa's in-process engine for a model folder, with the recipe's engine
    settings (one engine per folder and settings in a process)."""
    from copa.inference.engine import make_lm

    return make_lm(model_path, name, max_tokens=max_tokens, cache_tag=cache_tag,
                   **local_engine_args(recipe))


# --- the engine table's starters: (recipe, model, name, settings, ...) -> a block's dspy.LM ---

@contextmanager
def start_local(recipe: Recipe, model_path: str, name: str, settings: dict[str, Any], *,
                max_tokens: int, run_dir: Path | None, emit: Emit) -> Iterator[dspy.LM]:
    """copa's in-process engine (loaded once per process; the LM outlives the block). With a
    run directory, its answers go to the response cache there."""
    tag = None
    if settings["response_cache"] and run_dir is not None:
        if not Path(model_path).is_dir():  # a hub id: load (fetch) it before naming its commit
            local_lm(recipe, model_path, name, max_tokens)
        tag = response_cache_tag(recipe, model_path, run_dir, emit)
    yield local_lm(recipe, model_path, name, max_tokens, cache_tag=tag)


@contextmanager
def start_server(recipe: Recipe, model_path: str, name: str, settings: dict[str, Any], *,
                 max_tokens: int, run_dir: Path | None, emit: Emit) -> Iterator[dspy.LM]:
    """A server copa starts for the block (serve.engine names which), logging to run_dir/serve."""
    from copa.inference.servers import serving

    with serving(recipe.serve.engine, model_path, name, max_tokens=max_tokens,
                 log_dir=run_dir / "serve" if run_dir is not None else None,
                 trust_remote_code=recipe.model.trust_remote_code) as lm:
        yield lm


@contextmanager
def start_users_server(recipe: Recipe, model_path: str, name: str, settings: dict[str, Any], *,
                       max_tokens: int, run_dir: Path | None, emit: Emit) -> Iterator[dspy.LM]:
    """The user's server, asked for each arm's model by the id it serves it under."""
    from copa.inference.servers import server_lm

    model = recipe.serve.model_for(name) or model_path
    yield server_lm(settings["api_base"], model, api_key=settings["api_key"],
                    max_tokens=max_tokens)


def starter(engine: str) -> Starter:
    """The function the engine table names for an engine."""
    module, _, function = ENGINES[engine].starts.partition(":")
    return getattr(importlib.import_module(module), function)


def in_process(recipe: Recipe) -> bool:
    """Whether serve.engine runs in this process: its LMs still answer after their model_lm
    block (a server copa started stops with it), and its token counts are copa's."""
    return ENGINES[recipe.serve.engine].in_process


@contextmanager
def model_lm(recipe: Recipe, model_path: str, name: str, run_dir: Path | None = None,
             emit: Emit = print) -> Iterator[dspy.LM]:
    """An arm's DSPy LM for a model folder on serve.engine, alive for the block. `name` is the
    arm's model role (base, merged, ...). With a run directory, the local engine's answers go
    to DSPy's response cache there (run_dir/cache) and a copa-started server logs to
    run_dir/serve."""
    with starter(recipe.serve.engine)(recipe, model_path, name, engine_settings(recipe),
                                      max_tokens=recipe.evaluate.max_tokens, run_dir=run_dir,
                                      emit=emit) as lm:
        yield lm


def role_model_path(recipe: Recipe, ref: str, base_path: str, merged_path: str | None) -> str:
    """A local model reference as a folder transformers can load."""
    if ref == "base":
        return base_path
    if ref == "merged":
        if merged_path is None:
            raise ValueError("the merged model does not exist yet here (no fine-tune, or the "
                             "prompt stage runs before training with order p->w)")
        return merged_path
    from copa.models import resolve_model

    return resolve_model(ref, recipe.base_dir)


@contextmanager
def role_lm(recipe: Recipe, ref: ModelRef, name: str, base_path: str,
            merged_path: str | None) -> Iterator[dspy.LM | None]:
    """The DSPy LM for an optimizer's proposer or teacher, with the optimizer's token budget
    (optimize.max_tokens), or None (the arm's own model). A local model shares copa's engine
    (loaded once per process) and samples when an optimizer asks for a temperature."""
    if ref is None:
        yield None
        return
    budget = recipe.optimize.max_tokens
    if isinstance(ref, ServedModel):
        from copa.inference.servers import server_lm

        yield server_lm(ref.api_base, ref.model, api_key=ref.api_key, max_tokens=budget)
        return
    yield local_lm(recipe, role_model_path(recipe, ref, base_path, merged_path), name, budget)


def routing_lm(recipe: Recipe, folder: str, run_dir: Path, *, cache: bool, max_tokens: int,
               provider: Callable[[Any, Path | None], Any], **lm_kwargs: Any) -> dspy.LM:
    """The fine-tunable role: a dspy.LM on copa's RoutingEngine (each request on the model
    its "copa/<folder>" id names), with the Provider `provider(engine, fingerprints)` makes.
    cache: DSPy's response cache, keyed by a hash of the weights (fingerprints: where the
    provider keys the models it trains)."""
    from copa.inference.router import AsyncRoutingEngine, RoutingEngine, model_id

    args = local_engine_args(recipe)
    engine = RoutingEngine(default_max_tokens=max_tokens, **args)
    tag = response_cache_tag(recipe, folder, run_dir, emit=lambda _: None) if cache else None
    made = provider(engine, fingerprints(run_dir) if cache else None)
    return dspy.LM(model_id(folder, tag), engine=engine, async_engine=AsyncRoutingEngine(engine),
                   cache=cache and tag is not None, max_tokens=max_tokens, provider=made,
                   **lm_kwargs)
