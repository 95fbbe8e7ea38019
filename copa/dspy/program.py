"""The DSPy program a recipe describes: a signature in Predict / ChainOfThought / a user module."""

from __future__ import annotations

from typing import Any

import dspy

from copa.prompting import default_instructions
from copa.recipe import Recipe
from copa.recipe.usercode import import_object


def make_signature(recipe: Recipe) -> type[dspy.Signature]:
    task = recipe.task
    instructions = task.instructions or default_instructions(task.input_fields, task.output_fields)
    return dspy.Signature(task.signature, instructions)


def make_program(recipe: Recipe) -> dspy.Module:
    signature = make_signature(recipe)
    module = recipe.task.module
    if module == "predict":
        return dspy.Predict(signature)
    if module == "chain_of_thought":
        return dspy.ChainOfThought(signature)
    cls: Any = import_object(module, recipe.base_dir)
    return cls(signature)


def to_examples(recipe: Recipe, rows: list[dict[str, str]]) -> list[dspy.Example]:
    inputs = recipe.task.input_fields
    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]
