"""COPAOptimizer: fine-tune first (Axolotl, through the pipeline's backend stages), then optimize
prompts with any DSPy optimizer, choosing on the val split so the prompt stage can never make the
program worse there than the plain (zero-demo) program. It drives the pipeline, so it sits above it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import dspy

from copa.dspy.kit import model_lm, task_kit
from copa.dspy.search import Emit, PromptResult, prompt_optimize, with_demos


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
        self.wait = wait  # another process in the run directory: wait for it (else RunDirBusy)
        self.recipe_path = recipe
        self.metric = metric
        self.run_dir = run_dir
        self.order = order
        self.emit = emit
        self.result: PromptResult | None = None
        self.model_path: str | None = None
        self.adapter: dspy.Adapter | None = None

    def compile(self, student: dspy.Module, *, trainset: list[dspy.Example],
                valset: list[dspy.Example] | None = None, **_: Any) -> dspy.Module:
        from copa import pipeline
        from copa.runs import open_run

        overrides = {"optimize.order": self.order} if self.order else None
        # the run directory stays locked while this writes there (stages, the response cache)
        with open_run(self.recipe_path, run_dir=self.run_dir, emit=self.emit,
                      overrides=overrides, wait=self.wait) as run:
            # render (with "p" first when order is p->w), train and merge, through the stage cache
            pipeline.run_stages(run, stages=["merge"])
            recipe = run.recipe
            kit = task_kit(recipe, [dict(e) for e in trainset],
                           [dict(e) for e in (valset or trainset)], run.checked.spec)
            extra: dict[str, dspy.Module] = {}
            demos = json.loads((run.rendered / "demos.json").read_text())
            if demos:
                extra["finetune_demos"] = with_demos(student, demos, recipe)
            with model_lm(recipe, str(run.merged), "merged", run.dir) as lm:
                self.result = prompt_optimize(recipe, student, lm, kit.adapter, kit.trainset,
                                              kit.valset, self.metric or kit.metric, extra,
                                              emit=self.emit)
        self.model_path = str(run.merged)
        self.adapter = kit.adapter  # run the program under dspy.context(adapter=...)
        program = self.result.program
        if recipe.serve.engine == "local":  # a server's LM dies with its block
            program.set_lm(lm)
        return program
