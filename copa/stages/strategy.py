"""The combined arm under `optimize.strategy` (anything but copa's own "w -> p"): DSPy's
BetterTogether on the train split, choosing on the val split, with the recipe's prompt optimizer
as "p" and BootstrapFinetune as "w". "w" fine-tunes through AxolotlProvider (copa.provider):
the same Axolotl backend, config rendering and merge as the pipeline's train and merge stages,
and rows written by the program's own adapter, so training and inference share one format.

The other arms stay as they are: prompt-only on the base model, and fine-tune-only from the
pipeline's own demo-free fine-tune, prompted plainly.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import dspy

from copa.dspy.adapter import finetune_rows_adapter
from copa.dspy.kit import TaskKit, base_model_path
from copa.dspy.lms import role_lm
from copa.dspy.scoring import dspy_chatter_to
from copa.dspy.search import build_optimizer, compile_params, demo_count, program_view
from copa.inference.router import model_of
from copa.provider.lm import provider_lm

ORIGINAL = "original"  # BetterTogether's empty strategy: the program before any step


class StrategyError(Exception):
    """A BetterTogether step failed (DSPy would go on with the best program so far)."""


class _StepErrors(logging.Handler):
    """Keeps the exceptions BetterTogether logs for the steps that failed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def program_model(program: dspy.Module) -> str:
    """The model folder (or hub id) a program's predictors run on; one model per program."""
    models = {model_of(p.lm.model) for p in program.predictors() if p.lm is not None}
    if len(models) != 1:
        raise StrategyError(f"expected one model for the program's predictors, got {models}")
    return models.pop()


def _without_lms(program: dspy.Module) -> dspy.Module:
    """A copy to save: the model is recorded beside it, and the evaluate stage sets it again."""
    clone = program.deepcopy()
    for predictor in clone.predictors():
        predictor.lm = None
    return clone


def strategy_arm(run: Any, kit: TaskKit, save: Any, out: Path) -> tuple[dspy.Module,
                                                                        dict[str, Any]]:
    """Run BetterTogether with the recipe's strategy; save its pick as out/program_combined.json
    (with `save(program, path)`) and return the pick (its predictors on their LMs) and the
    arm's summary: every candidate it scored with its strategy prefix, val score and model,
    and whether the training rows carried demos."""
    recipe = run.recipe
    opt = recipe.optimize
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "dspy-combined.log"
    start = time.time()
    base = base_model_path(recipe)
    lm = provider_lm(base, recipe=recipe, run_dir=run.dir, cache=recipe.serve.response_cache,
                     emit=run.emit)
    student = kit.program.deepcopy()
    student.set_lm(lm)
    exclude_demos = recipe.finetune.demos != "program"
    run.emit(f"  [combined] BetterTogether '{opt.strategy}' on {len(kit.trainset)} train / "
             f"{len(kit.valset)} val: p = {opt.optimizer}, w = BootstrapFinetune through Axolotl "
             f"(training rows {'without' if exclude_demos else 'with'} the program's demos; "
             f"its log: {log_path})")
    merged = str(run.merged) if run.finetunes and run.merged.is_dir() else None
    with role_lm(recipe, opt.proposer, "proposer", base, merged) as proposer, \
            role_lm(recipe, opt.teacher, "teacher", base, merged) as teacher:
        prompt_optimizer = build_optimizer(recipe, kit.metric, lm, proposer, teacher)
        weights_optimizer = dspy.BootstrapFinetune(
            metric=kit.metric, adapter=finetune_rows_adapter(kit.adapter),
            exclude_demos=exclude_demos, num_threads=opt.num_threads)
        together = dspy.BetterTogether(metric=kit.metric, p=prompt_optimizer, w=weights_optimizer)
        compile_args = {"p": compile_params(type(prompt_optimizer), dict(opt.params))}
        if "requires_permission_to_run" in inspect.signature(prompt_optimizer.compile).parameters:
            compile_args["p"]["requires_permission_to_run"] = False  # MIPROv2 asks otherwise
        failures = _StepErrors()
        step_logger = logging.getLogger("dspy.teleprompt.bettertogether")
        step_logger.addHandler(failures)
        try:
            with dspy.context(lm=lm, adapter=kit.adapter), dspy_chatter_to(log_path):
                best = together.compile(student, trainset=list(kit.trainset),
                                        valset=list(kit.valset), num_threads=opt.num_threads,
                                        seed=recipe.finetune.seed, strategy=opt.strategy,
                                        optimizer_compile_args=compile_args or None)
        finally:
            step_logger.removeHandler(failures)
    if getattr(best, "flag_compilation_error_occurred", False):
        first = failures.errors[0] if failures.errors else None
        raise StrategyError(f"optimize.strategy '{opt.strategy}': a step failed: "
                            f"{type(first).__name__ if first else 'error'}: {first} "
                            f"(DSPy's log: {log_path})") from first
    candidates = [{"strategy": c["strategy"] or ORIGINAL,
                   "val_score": None if c["score"] is None else c["score"] / 100.0,
                   "model": program_model(c["program"]), "demos": demo_count(c["program"])}
                  for c in sorted(best.candidate_programs, key=lambda c: len(c["strategy"]))]
    winner = best.candidate_programs[0]["strategy"] or ORIGINAL
    model = program_model(best)
    save(_without_lms(best), out / "program_combined.json")
    for c in candidates:
        score = "n/a" if c["val_score"] is None else f"{c['val_score']:.3f}"
        run.emit(f"  candidate {c['strategy']:<12} val {score}  ({c['demos']} demos)")
    run.emit(f"  [combined] BetterTogether picked '{winner}'")
    return best, {
        "strategy": opt.strategy, "winner": winner, "model": model,
        "val_scores": {c["strategy"]: c["val_score"] for c in candidates
                       if c["val_score"] is not None},
        "candidates": candidates, "demos": demo_count(best),
        "training_rows_carried_demos": not exclude_demos,
        "finetunes": list(lm.provider.history), "seconds": round(time.time() - start, 2),
        "kept": program_view(best), "optimizer_pick": None, "optimized_demos": None,
        "val_errors": {}, "lm_errors": 0}
