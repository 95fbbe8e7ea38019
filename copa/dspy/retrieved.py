"""The retrieved-demos program (`optimize.optimizer: retrieved`, params {k, by}): for every input
the k most similar train rows are its demos (DSPy's KNNFewShot idea, without bootstrapping),
chosen by the same BM25 ranking (copa.data.demos) that `finetune.demos: {pick: retrieved}` trains
with, or (`by: hidden`) by the cosine of the recipe's base model's mean-pooled hidden states
(copa.inference.embed; the model is named in the program file and loaded where it runs).

The train rows it draws from are part of its saved state, so a program file is all that
`copa.load`, `copa predict`, `copa serve` and `copa export` need: `load_program` sees the mark
in the file and wraps the recipe's program before loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dspy

from copa.data.demos import RETRIEVED_MARK as MARK
from copa.data.demos import DemoIndex
from copa.files import read_json_object
from copa.prompting import field_value

METHODS = ("bm25", "hidden")


class RetrievedDemos(dspy.Module):
    """Wraps a program: each call runs a copy of it whose predictors hold the k train rows
    nearest to this input as demos (a copy per call: concurrent calls never share demos)."""

    def __init__(self, program: dspy.Module, rows: Sequence[dict[str, Any]],
                 input_fields: Sequence[str], k: int, by: str = "bm25",
                 model: str | None = None) -> None:
        super().__init__()
        if by not in METHODS:
            raise ValueError(f"by: {by!r}: copa retrieves demos by {', '.join(METHODS)}")
        if by == "hidden" and not model:
            raise ValueError("by: hidden needs the model whose hidden states rank the rows")
        self.program = program
        self.settings = {"k": int(k), "by": by, "inputs": list(input_fields),
                         "rows": [dict(r) for r in rows],
                         **({"model": model} if by == "hidden" else {})}
        self._build()

    def _build(self) -> None:
        rows, inputs = self.settings["rows"], self.settings["inputs"]
        self._examples = [dspy.Example(**row).with_inputs(*inputs) for row in rows]
        similarity = None
        if self.settings["by"] == "hidden":
            from copa.inference.embed import HiddenStateSimilarity
            from copa.models import resolve_model

            similarity = HiddenStateSimilarity(rows, inputs,
                                               resolve_model(self.settings["model"]))
        self._index = DemoIndex(rows, inputs, similarity)

    @property
    def retrieved_k(self) -> int:
        return int(self.settings["k"])

    def demos_for(self, inputs: dict[str, Any]) -> list[dspy.Example]:
        """The demos an input gets, most similar first."""
        return [self._examples[i] for i in self._index.nearest(inputs, self.retrieved_k)]

    def forward(self, **inputs: Any) -> dspy.Prediction:
        program = self.program.deepcopy()
        demos = self.demos_for(inputs)
        for predictor in program.predictors():
            predictor.demos = list(demos)
        return program(**inputs)

    def dump_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**super().dump_state(*args, **kwargs), MARK: self.settings}

    def load_state(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> RetrievedDemos:
        super().load_state({k: v for k, v in state.items() if k != MARK}, *args, **kwargs)
        if MARK in state:
            self.settings = dict(state[MARK])
            self._build()
        return self

    # DSPy deep-copies candidates; the rows and the index are read-only, so shared.
    def __deepcopy__(self, memo: dict) -> RetrievedDemos:
        clone = object.__new__(RetrievedDemos)
        clone.__dict__.update(self.__dict__)
        clone.program = self.program.deepcopy()
        return clone


def retrieved_program(program: dspy.Module, trainset: Sequence[dspy.Example],
                      params: dict[str, Any], model: str | None = None) -> RetrievedDemos:
    """The recipe's program with per-input demos from the train split; `model` (a preset name
    or a model folder) ranks them for `by: hidden`."""
    unknown = sorted(set(params) - {"k", "by"})
    if unknown:
        raise ValueError(f"optimize.params: 'retrieved' takes k and by, not {unknown}")
    rows = []
    for example in trainset:
        row = dict(example)
        rows.append({k: field_value(v) for k, v in row.items() if not k.startswith("dspy_")})
    inputs = list(trainset[0].inputs().keys()) if trainset else []
    return RetrievedDemos(program.deepcopy(), rows, inputs, params.get("k", 3),
                          params.get("by", "bm25"), model)


def ranking_model(recipe: Any) -> str | None:
    """The model `by: hidden` ranks with, as the program file names it: the recipe's base
    model, a preset's name as written (it resolves on any machine copa is installed on), else
    the resolved folder."""
    if recipe.optimize.params.get("by") != "hidden":
        return None
    from copa.models import classify, resolve_model

    base = recipe.model.base
    return base if classify(base, recipe.base_dir).kind == "alias" else resolve_model(
        base, recipe.base_dir)


def retrieved_info(program: Any) -> dict[str, Any] | None:
    """{k, by, rows} of a retrieved-demos program (a module or its saved state), else None."""
    if isinstance(program, RetrievedDemos):
        settings = program.settings
    elif isinstance(program, dict) and MARK in program:
        settings = program[MARK]
    else:
        return None
    return {"k": settings["k"], "by": settings["by"], "rows": len(settings["rows"])}


def load_program(program: dspy.Module, path: str | Path, recipe: Any = None) -> dspy.Module:
    """A saved program loaded into a copy of the recipe's program; a retrieved-demos program
    is rebuilt around it first (its rows come from the file)."""
    state = read_json_object(Path(path))  # a damaged file: a DamagedFile naming it
    loaded = program.deepcopy()
    if MARK in state:
        info = state[MARK]
        loaded = RetrievedDemos(loaded, info["rows"], info["inputs"], info["k"], info["by"],
                                info.get("model"))
    loaded.load(str(path))
    return loaded
