"""The prompt search: run any DSPy optimizer on a program, then keep the best on val among the
plain program, the optimizer's pick and any extra candidates, so the prompt stage can never make
a program worse on val than the plain (zero-demo) one.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from copa.dspy.program import to_examples
from copa.recipe import Recipe
from copa.recipe.usercode import import_object

Emit = Callable[[str], None]


class OptimizeError(Exception):
    pass


def resolve_optimizer(name: str, base_dir: Path | None = None) -> type:
    """A DSPy optimizer class by name (dspy.<Name>) or a user's 'package.module:Class' (looked up
    with the recipe's folder, base_dir, on sys.path)."""
    if ":" in name:
        return import_object(name, base_dir)
    cls = getattr(dspy, name, None) or getattr(dspy.teleprompt, name, None)
    if cls is None or not inspect.isclass(cls):
        raise OptimizeError(f"optimize.optimizer: DSPy has no optimizer named '{name}' "
                            "(e.g. BootstrapFewShot, BootstrapFewShotWithRandomSearch, MIPROv2)")
    return cls


# The optimizer arguments that name the LM writing instructions or reflections (not answers).
WRITER_LM_PARAMS = ("prompt_model", "reflection_lm")


def feedback_metric(metric: Callable[..., Any], output_field: str) -> Callable[..., Any]:
    """The five-argument metric GEPA calls, with a short textual feedback beside the score.
    A user metric that already returns a dspy.Prediction(score=..., feedback=...) passes
    through unchanged."""

    def gepa_metric(gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None,
                    pred_trace: Any = None) -> Any:
        result = metric(gold, pred, trace)
        if isinstance(result, dspy.Prediction):
            return result
        score = float(result)
        expected, got = gold.get(output_field), getattr(pred, output_field, None)
        feedback = ("correct" if score >= 1.0 else
                    f"expected {expected!r}, got {got!r}" + ("" if score <= 0.0 else
                                                             f" (score {score:.2f})"))
        return dspy.Prediction(score=score, feedback=feedback)

    return gepa_metric


def build_optimizer(recipe: Recipe, metric: Callable[..., Any], lm: dspy.LM | None = None,
                    proposer: dspy.LM | None = None, teacher: dspy.LM | None = None) -> Any:
    """The recipe's optimizer. The LM that writes instructions or reflections (MIPROv2's
    prompt_model, GEPA's reflection_lm) is the recipe's proposer, or else the task's LM with
    its own token budget (optimize.max_tokens): at the task's answer length it would be cut
    after a few words. A teacher bootstraps demos where the optimizer takes teacher_settings."""
    cls = resolve_optimizer(recipe.optimize.optimizer, recipe.base_dir)
    params = dict(recipe.optimize.params)
    accepted = inspect.signature(cls.__init__).parameters
    if "num_threads" in accepted and "num_threads" not in params:
        params["num_threads"] = recipe.optimize.num_threads
    if "seed" in accepted and "seed" not in params:
        params["seed"] = recipe.finetune.seed
    if lm is not None:
        if "task_model" in accepted and params.get("task_model") is None:
            params["task_model"] = lm  # MIPROv2 wants both models named, or neither
        for name in WRITER_LM_PARAMS:
            if name in accepted and params.get(name) is None:
                params[name] = proposer or lm.copy(max_tokens=recipe.optimize.max_tokens)
    if teacher is not None and "teacher_settings" in accepted:
        params["teacher_settings"] = {**(params.get("teacher_settings") or {}), "lm": teacher}
    if "reflection_lm" in accepted:  # GEPA: a score and a feedback per example
        metric = feedback_metric(metric, recipe.task.output_fields[-1])
    try:
        return cls(metric=metric, **params)
    except TypeError as exc:
        raise OptimizeError(f"optimize.params: {recipe.optimize.optimizer} rejects them: {exc}") \
            from None


def compile_program(optimizer: Any, program: dspy.Module, trainset: list[dspy.Example],
                    valset: list[dspy.Example]) -> dspy.Module:
    accepted = inspect.signature(optimizer.compile).parameters
    kwargs: dict[str, Any] = {"trainset": trainset}
    if "valset" in accepted:
        kwargs["valset"] = valset
    if "requires_permission_to_run" in accepted:  # MIPROv2 asks on stdin otherwise
        kwargs["requires_permission_to_run"] = False
    return optimizer.compile(program, **kwargs)


def score(program: dspy.Module, devset: list[dspy.Example], metric: Callable[..., Any],
          num_threads: int) -> tuple[float, list[Any]]:
    """Mean metric (0..1) and per-example (example, prediction, score) on a devset."""
    evaluator = dspy.Evaluate(devset=devset, metric=metric, num_threads=num_threads,
                              display_progress=False, max_errors=len(devset) + 1)
    result = evaluator(program)
    scores = [float(s) for _, _, s in result.results]
    return (sum(scores) / len(scores) if scores else 0.0), result.results


@contextmanager
def dspy_chatter_to(log_path: Path | None) -> Iterator[None]:
    """DSPy optimizers print progress bars and notes; keep them in the run's log, not the
    terminal (a user reads copa's own one-line progress)."""
    import contextlib
    import logging

    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("dspy")
    with open(log_path, "a", encoding="utf-8") as handle:
        handler = logging.StreamHandler(handle)
        old_level, old_propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate


def demo_count(program: dspy.Module) -> int:
    return sum(len(p.demos) for p in program.predictors())


def with_demos(program: dspy.Module, demos: Sequence[dict[str, str]],
               recipe: Recipe) -> dspy.Module:
    clone = program.deepcopy()
    examples = to_examples(recipe, list(demos))
    for predictor in clone.predictors():
        predictor.demos = list(examples)
    return clone


@dataclass
class PromptResult:
    program: dspy.Module
    winner: str
    val_scores: dict[str, float] = field(default_factory=dict)
    demos: int = 0
    seconds: float = 0.0
    optimized: dspy.Module | None = None  # the optimizer's own pick, even if the guard declined

    def summary(self) -> dict[str, Any]:
        optimized = demo_count(self.optimized) if self.optimized is not None else None
        return {"winner": self.winner, "val_scores": self.val_scores, "demos": self.demos,
                "optimized_demos": optimized, "seconds": round(self.seconds, 2)}


def prompt_optimize(recipe: Recipe, program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter,
                    trainset: list[dspy.Example], valset: list[dspy.Example],
                    metric: Callable[..., Any], extra: dict[str, dspy.Module] | None = None,
                    emit: Emit = print, log_path: Path | None = None,
                    proposer: dspy.LM | None = None,
                    teacher: dspy.LM | None = None) -> PromptResult:
    """Run the recipe's optimizer, then keep the best on val of: plain, optimized, extras.

    Ties go to the program with fewer demos (cheaper, and what the fine-tune saw).
    """
    start = time.time()
    threads = recipe.optimize.num_threads
    with dspy.context(lm=lm, adapter=adapter):
        candidates: dict[str, dspy.Module] = {"plain": program.deepcopy()}
        candidates.update(extra or {})
        emit(f"  {recipe.optimize.optimizer} on {len(trainset)} train / {len(valset)} val"
             + (f" (its log: {log_path})" if log_path else ""))
        with dspy_chatter_to(log_path):
            optimizer = build_optimizer(recipe, metric, lm, proposer, teacher)
            candidates["optimized"] = compile_program(optimizer, program.deepcopy(), trainset,
                                                      valset)
        if not recipe.optimize.guard:
            chosen = candidates["optimized"]
            return PromptResult(chosen, "optimized", {}, demo_count(chosen), time.time() - start,
                                chosen)
        with dspy_chatter_to(log_path):
            val_scores = {name: score(p, valset, metric, threads)[0]
                          for name, p in candidates.items()}
    best = max(candidates, key=lambda n: (val_scores[n], -demo_count(candidates[n]),
                                          n == "plain"))
    emit("  val: " + ", ".join(f"{n} {s:.3f}" for n, s in val_scores.items())
         + f" -> {best}")
    chosen = candidates[best]
    return PromptResult(chosen, best, val_scores, demo_count(chosen), time.time() - start,
                        candidates["optimized"])


