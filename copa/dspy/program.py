"""The DSPy program a recipe describes: a signature in Predict / ChainOfThought / a user module,
and with a `retrieve:` section, that program answering from the passages retrieved for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

from copa.prompting import default_instructions
from copa.recipe import Recipe
from copa.usercode import import_object

if TYPE_CHECKING:
    from copa.data.retrieval import Retriever


def make_signature(recipe: Recipe) -> type[dspy.Signature]:
    task = recipe.task
    instructions = task.instructions or default_instructions(task.input_fields, task.output_fields)
    signature = dspy.Signature(task.signature, instructions)
    if recipe.retrieve is not None:  # the passages come first, as the template shows them
        signature = signature.prepend(recipe.retrieve.field, dspy.InputField(
            desc="passages retrieved for the question"), type_=list[str])
    return signature


class RetrieveThenAnswer(dspy.Module):
    """Retrieves k passages for the query field, then runs the answering program with them.
    The retriever is attached by make_program and never saved with the program's state."""

    def __init__(self, answer: dspy.Module, retriever: Retriever | None, passages_field: str,
                 query_field: str) -> None:
        super().__init__()
        self.answer = answer
        self.retriever = retriever
        self.passages_field = passages_field
        self.query_field = query_field

    def forward(self, **inputs: Any) -> dspy.Prediction:
        if self.retriever is None:
            raise RuntimeError("this RAG program has no retriever: build it with "
                               "make_program(recipe, retriever=...)")
        passages = self.retriever.search(str(inputs[self.query_field]))
        return self.answer(**{self.passages_field: passages}, **inputs)


def make_program(recipe: Recipe, retriever: Retriever | None = None) -> dspy.Module:
    signature = make_signature(recipe)
    module = recipe.task.module
    if module == "predict":
        program: dspy.Module = dspy.Predict(signature)
    elif module == "chain_of_thought":
        program = dspy.ChainOfThought(signature)
    else:
        cls: Any = import_object(module, recipe.base_dir)
        program = cls(signature)
    if recipe.retrieve is None:
        return program
    query = recipe.retrieve.query or recipe.task.input_fields[0]
    return RetrieveThenAnswer(program, retriever, recipe.retrieve.field, query)


def to_examples(recipe: Recipe, rows: list[dict[str, Any]]) -> list[dspy.Example]:
    inputs = recipe.task.input_fields
    return [dspy.Example(**row).with_inputs(*inputs) for row in rows]
