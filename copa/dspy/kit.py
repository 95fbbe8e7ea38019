"""What every arm of a run shares on the DSPy side: the program, the adapter, the metric and
the data as DSPy examples (the LMs they run on: copa.dspy.lms)."""

from __future__ import annotations

from collections.abc import Callable
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
                           answers_field="answers" if recipe.data.answers_column else None,
                           where=f"{recipe.source_path or '<recipe>'}: evaluate.metric"),
        trainset=to_examples(recipe, train_rows), valset=to_examples(recipe, val_rows))


def run_retriever(recipe: Recipe, rendered_dir: Path) -> Retriever | None:
    """A RAG recipe's index, as the render stage left it in the run directory (None without
    a retrieve section)."""
    if recipe.retrieve is None:
        return None
    from copa.data.retrieval import load_retriever

    return load_retriever(Path(rendered_dir) / INDEX_DIR, recipe.retrieve.k)


def base_model_path(recipe: Recipe) -> str:
    from copa.models import resolve_model

    return resolve_model(recipe.model.base, recipe.base_dir)
