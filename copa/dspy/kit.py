"""What every arm of a run shares on the DSPy side: the program, the adapter, the metric, the
data as DSPy examples, and the DSPy LM for a model folder (local engine or a server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from copa.data.retrieval import INDEX_DIR, Retriever, with_passages
from copa.dspy.adapter import TemplateAdapter
from copa.dspy.metrics import make_metric
from copa.dspy.program import make_program, to_examples
from copa.prompting import PromptSpec, spec_from_recipe
from copa.recipe import Recipe


@dataclass
class TaskKit:
    """What every arm shares: the program, the adapter, the metric and the data splits."""

    recipe: Recipe
    spec: PromptSpec
    program: dspy.Module
    adapter: dspy.Adapter
    metric: Callable[..., Any]
    trainset: list[dspy.Example]
    valset: list[dspy.Example]


def make_adapter(recipe: Recipe, spec: PromptSpec) -> dspy.Adapter:
    if recipe.optimize.adapter == "chat":
        return dspy.ChatAdapter()
    return TemplateAdapter(spec)


def task_kit(recipe: Recipe, train_rows: list[dict], val_rows: list[dict],
             spec: PromptSpec | None = None, retriever: Retriever | None = None) -> TaskKit:
    """With a retriever (RAG recipes), the program retrieves its passages, and the train / val
    examples carry the passages it retrieves for them (so labeled demos are complete)."""
    spec = spec or spec_from_recipe(recipe)
    if retriever is not None:
        train_rows = with_passages(recipe, retriever, train_rows)
        val_rows = with_passages(recipe, retriever, val_rows)
    return TaskKit(
        recipe=recipe, spec=spec, program=make_program(recipe, retriever),
        adapter=make_adapter(recipe, spec),
        metric=make_metric(recipe.evaluate.metric, recipe.task.output_fields[-1],
                           recipe.task.choices, recipe.base_dir,
                           answers_field="answers" if recipe.data.answers_column else None),
        trainset=to_examples(recipe, train_rows), valset=to_examples(recipe, val_rows))


def run_retriever(recipe: Recipe, rendered_dir: Path) -> Retriever | None:
    """A RAG recipe's index, as the render stage left it in the run directory (None without
    a retrieve section)."""
    if recipe.retrieve is None:
        return None
    from copa.data.retrieval import load_retriever

    return load_retriever(Path(rendered_dir) / INDEX_DIR, recipe.retrieve.k)


_UNCACHED_SAID: set[str] = set()  # models already reported as not cached, said once each


def local_lm(recipe: Recipe, model_path: str, name: str, max_tokens: int,
             cache_tag: str | None = None) -> dspy.LM:
    """A dspy.LM on copa's in-process engine for a model folder, with the recipe's engine
    settings (one engine per folder and settings in a process)."""
    from copa.inference.engine import make_lm

    serve = recipe.serve
    return make_lm(model_path, name, max_batch_size=serve.max_batch_size,
                   batch_wait_ms=serve.batch_wait_ms, max_tokens=max_tokens,
                   prefix_cache=serve.prefix_cache, cache_tag=cache_tag,
                   trust_remote_code=recipe.model.trust_remote_code, precision=serve.precision)


@contextmanager
def model_lm(recipe: Recipe, model_path: str, name: str, run_dir: Path | None = None,
             emit: Callable[[str], None] = print) -> Iterator[dspy.LM]:
    """The DSPy LM for a model folder: the in-process batched engine (loaded once per process),
    or an OpenAI-compatible server that lives exactly as long as this block (recipe.serve).
    With a run directory, the local engine's answers go to DSPy's response cache there
    (run_dir/cache) and a copa-started server logs to run_dir/serve."""
    serve = recipe.serve
    if serve.engine == "local":
        tag = None
        if serve.response_cache and run_dir is not None:
            from copa.inference.cache import use_response_cache, weights_tag

            use_response_cache(run_dir / "cache" / "dspy")
            if not Path(model_path).is_dir():  # a hub id: load (fetch) it before naming its commit
                local_lm(recipe, model_path, name, recipe.evaluate.max_tokens)
            tag = weights_tag(model_path, run_dir / "cache" / "fingerprints.json",
                              serve.precision)
            if tag is None and model_path not in _UNCACHED_SAID:
                _UNCACHED_SAID.add(model_path)
                emit(f"  response cache off for {model_path}: nothing identifies its weights "
                     "(not a local folder, not in the local hub cache)")
        yield local_lm(recipe, model_path, name, recipe.evaluate.max_tokens, cache_tag=tag)
        return
    from copa.inference.servers import serving

    if serve.engine == "openai":  # the user's server knows each arm's model by its own id
        name = serve.model_for(name) or ""
    with serving(serve.engine, model_path, name, api_base=serve.api_base,
                 api_key=serve.api_key, max_tokens=recipe.evaluate.max_tokens,
                 log_dir=run_dir / "serve" if run_dir is not None else None,
                 trust_remote_code=recipe.model.trust_remote_code) as lm:
        yield lm


def base_model_path(recipe: Recipe) -> str:
    from copa.models import resolve_model

    return resolve_model(recipe.model.base, recipe.base_dir)
