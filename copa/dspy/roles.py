"""The models that write for an optimizer: a proposer (instructions, reflections) and a teacher
(bootstrapped demos), as a recipe's `optimize.proposer` / `optimize.teacher` name them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dspy

from copa.dspy.kit import local_lm
from copa.recipe import Recipe
from copa.recipe.schema import ModelRef, ServedModel


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
    """The DSPy LM for one role with the optimizer's token budget, or None (the arm's own
    model). A local model shares copa's engine (loaded once per process) and samples when an
    optimizer asks for a temperature."""
    if ref is None:
        yield None
        return
    budget = recipe.optimize.max_tokens
    if isinstance(ref, ServedModel):
        from copa.inference.servers import server_lm

        yield server_lm(ref.api_base, ref.model, api_key=ref.api_key, max_tokens=budget)
        return
    yield local_lm(recipe, role_model_path(recipe, ref, base_path, merged_path), name, budget)
