"""COPAOptimizer: fine-tune first (Axolotl, through the pipeline's backend stages), then optimize
prompts with any DSPy optimizer, choosing on the val split so the prompt stage can never make the
program worse there than the plain (zero-demo) program. It drives the pipeline, so it sits above it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import dspy

from copa.dspy.search import Emit, PromptResult


class COPAOptimizer(dspy.teleprompt.Teleprompter):
    """Fine-tune the model with the recipe's backend, then prompt-optimize on the result.

    `order="w->p"` (default): train + merge (Axolotl), point the program at the merged model, run
    the recipe's DSPy optimizer, keep the best on val among plain / optimized.
    `order="p->w"`: optimize prompts on the base model first, fine-tune with the chosen demo set
    in every training row (as BetterTogether's "p -> w"), then choose on val again.

        >>> optimizer = COPAOptimizer("recipes/iris.yaml")
        >>> program = optimizer.compile(program, trainset=train, valset=val)
        >>> with dspy.context(adapter=optimizer.adapter):
        ...     program(**inputs)
    """

    def __init__(self, recipe: str | os.PathLike[str], metric: Callable[..., Any] | None = None,
                 run_dir: str | os.PathLike[str] | None = None, order: str | None = None,
                 emit: Emit = print, wait: bool = False):
        super().__init__()
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a function metric(example, prediction, trace=None) "
                            f"-> float, or None for the recipe's evaluate.metric (got "
                            f"{type(metric).__name__} {metric!r:.60})")
        if not callable(emit):
            raise TypeError(f"emit must be a function taking a line of text (got "
                            f"{type(emit).__name__})")
        self.wait = wait  # another process in the run directory: wait for it (else RunDirBusy)
        self.recipe_path = recipe
        self.metric = metric
        self.run_dir = run_dir
        self.order = order
        self.emit = emit
        self.result: PromptResult | None = None
        self.model_path: str | None = None
        self.adapter: dspy.Adapter | None = None

    def compile(self, student: dspy.Module, *, trainset: Sequence[dspy.Example],
                valset: Sequence[dspy.Example] | None = None, **_: Any) -> dspy.Module:
        """Fine-tune on `trainset` (rendered through the recipe's template, as `copa train`
        would render the recipe's own train split), then prompt-optimize, choosing on `valset`.
        Without a valset, a seeded fifth of the trainset is held out as val (and not trained
        on): choosing on training rows would reward memorising them.

        The prompt step is the optimize stage's combined arm (copa.stages.optimize), with
        `student` as the program and `metric` (if given) as the metric: every optimize: key
        means what it means in `copa run`. Its logs and program go to <run>/compile/."""
        import dataclasses

        from copa import pipeline
        from copa.data import Splits
        from copa.dspy.lms import in_process, model_lm
        from copa.runs import open_run
        from copa.stages.optimize import combined_arm, kit_for

        if not isinstance(student, dspy.Module):
            raise TypeError(f"student must be a dspy.Module, the program to optimize (got "
                            f"{type(student).__name__})")
        overrides = {"optimize.order": self.order} if self.order else None
        # the run directory stays locked while this writes there (stages, the response cache)
        with open_run(self.recipe_path, run_dir=self.run_dir, emit=self.emit,
                      overrides=overrides, wait=self.wait) as run:
            recipe = run.recipe
            train_rows, val_rows = self._split_rows(recipe, trainset, valset)
            # The given examples are the run's train / val splits: render writes them, trains
            # on them and keys its cache on them; the test split stays the recipe's.
            splits = Splits(train=train_rows, val=val_rows, test=run.checked.splits.test)
            run.checked = dataclasses.replace(run.checked, splits=splits)
            run.dir.mkdir(parents=True, exist_ok=True)
            # render (with "p" first when order is p->w), train and merge, through the cache
            pipeline.run_stages(run, stages=["merge"])
            kit = kit_for(run)  # the rendered splits: the rows just given
            kit = dataclasses.replace(kit, program=student, metric=self.metric or kit.metric)
            arm = combined_arm(run, kit, run.dir / "compile")
            lm = arm.lm
            if lm is None and arm.summary.get("strategy") is None and in_process(recipe):
                # optimize.enabled: false searched nothing, so no LM was made yet
                with model_lm(recipe, str(run.merged), "merged", run.dir, emit=self.emit) as lm:
                    pass
        self.result = arm.result
        self.model_path = str(run.merged)
        self.adapter = kit.adapter  # run the program under dspy.context(adapter=...)
        program = self.result.program
        if lm is not None:  # a copa-started server's LM died with its block
            program.set_lm(lm)
        return program

    def _split_rows(self, recipe: Any, trainset: Sequence[Any],
                    valset: Sequence[Any] | None) -> tuple[list[dict], list[dict]]:
        """Rows of the train and val examples, each value checked and written as a data cell is
        (copa.data.columns: one text or number, number_format on inputs, a gold answer not
        blank and among task.choices); a bad one is a ValueError naming the set and the example
        (numbered from 1), not a row trained on as 'None' or a list's repr."""
        import random

        train = _rows(recipe, trainset, "trainset")
        if not train:
            raise ValueError("trainset is empty: give the examples to fine-tune on")
        val = _rows(recipe, valset, "valset") if valset is not None else []
        if val:
            shared = _shared_inputs(recipe, train, val)
            if shared:
                more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
                raise ValueError(f"valset example {shared[0] + 1}{more} has the inputs of a "
                                 "trainset example: val chooses the program, and choosing on "
                                 "trained rows rewards memorising them")
            return train, val
        if len(train) < 2:
            raise ValueError("compile needs a valset, or a trainset of at least 2 examples to "
                             "hold some out as val")
        order = list(range(len(train)))
        random.Random(recipe.data.splits.seed).shuffle(order)
        n_val = max(1, len(train) // 5)
        held = set(order[:n_val])
        self.emit(f"COPAOptimizer: no valset given; holding out {n_val} of the {len(train)} "
                  f"trainset examples as val (seed {recipe.data.splits.seed}), training on "
                  f"the other {len(train) - n_val}")
        return ([r for i, r in enumerate(train) if i not in held],
                [r for i, r in enumerate(train) if i in held])


def _examples(examples: Any, name: str) -> list[Any]:
    """A list of examples (dspy.Example or mappings), else a TypeError naming the argument."""
    if isinstance(examples, (str, bytes, Mapping, dspy.Example)) or not isinstance(
            examples, Iterable):
        raise TypeError(f"{name} must be a list of dspy.Example (got {type(examples).__name__})")
    listed = list(examples)
    for n, example in enumerate(listed):
        if not isinstance(example, (dspy.Example, Mapping)):
            raise TypeError(f"{name} example {n + 1} must be a dspy.Example (got "
                            f"{type(example).__name__})")
    return listed


def _rows(recipe: Any, examples: Any, name: str) -> list[dict]:
    """The examples as rows of the signature's fields, checked as data.source's rows are."""
    from copa.data.columns import map_columns
    from copa.data.splits import check_labels
    from copa.recipe import RecipeError

    listed = _examples(examples, name)
    if not listed:
        return []
    # the examples are keyed by field name: no column mapping, answers or groups to read
    plain = recipe.model_copy(update={"data": recipe.data.model_copy(update={
        "columns": {}, "answers_column": None, "group_by": None})})
    try:
        rows = map_columns(plain, [dict(e) for e in listed], name)
        check_labels(plain, rows, name)
    except RecipeError as exc:
        raise ValueError("; ".join(f"{p.path}: {p.message}" for p in exc.problems)) from None
    return rows


def _shared_inputs(recipe: Any, train: list[dict], val: list[dict]) -> list[int]:
    """The val rows (by index) whose inputs are a train row's."""
    from copa.data.splits import input_key

    trained = {input_key(recipe, r) for r in train}
    return [i for i, r in enumerate(val) if input_key(recipe, r) in trained]
