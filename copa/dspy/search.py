"""The prompt search: run any DSPy optimizer on a program, then keep the best on val among the
plain program, the optimizer's pick and any extra candidates, so the prompt stage can never make
a program worse on val than the plain (zero-demo) one.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from copa.dspy.candidates import optimizer_candidates, optimizer_log_params
from copa.dspy.program import to_examples
from copa.dspy.retrieved import ranking_model, retrieved_info, retrieved_program
from copa.dspy.scoring import (
    LMErrorCounter,
    Scored,
    ScoreError,
    dspy_chatter_to,
    evaluate_program,
    raise_metric_fault,
)
from copa.recipe import Recipe
from copa.usercode import optimizer_class, optimizer_params, param_problem

Emit = Callable[[str], None]


RETRIEVED = "retrieved"  # optimize.optimizer: per-input demos (copa.dspy.retrieved)


class OptimizeError(Exception):
    pass


def resolve_optimizer(name: str, base_dir: Path | None = None) -> type:
    """A DSPy optimizer class by name (dspy.<Name>) or a user's 'package.module:Class' (looked up
    with the recipe's folder, base_dir, on sys.path)."""
    try:
        return optimizer_class(name, base_dir)
    except ImportError as exc:
        if ":" in name:  # the user's module: its own reason
            raise
        raise OptimizeError(f"optimize.optimizer: {exc}") from None


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
                    proposer: dspy.LM | None = None, teacher: dspy.LM | None = None,
                    log_dir: Path | None = None) -> Any:
    """The recipe's optimizer. The LM that writes instructions or reflections (MIPROv2's
    prompt_model, GEPA's reflection_lm) is the recipe's proposer, or else the task's LM with
    its own token budget (optimize.max_tokens): at the task's answer length it would be cut
    after a few words. A teacher bootstraps demos where the optimizer takes teacher_settings.
    The optimizer keeps its record of candidates (and its files in log_dir) where it can."""
    cls = resolve_optimizer(recipe.optimize.optimizer, recipe.base_dir)
    accepted = inspect.signature(cls.__init__).parameters
    params = {**optimizer_log_params(accepted, log_dir),
              **init_params(cls, dict(recipe.optimize.params))}
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
    if "instruction_proposer" in accepted and params.get("instruction_proposer") is None:
        # GEPA's own proposer asks its reflection model for JSON, which a small model rarely
        # writes (seen on Iris: every reflection failed); DSPy's documented knob is its adapter.
        from dspy.teleprompt.gepa import InstructionProposer

        from copa.dspy.adapter import WriterAdapter

        params["instruction_proposer"] = InstructionProposer(adapter=WriterAdapter())
    if "reflection_lm" in accepted:  # GEPA: a score and a feedback per example
        metric = feedback_metric(metric, recipe.task.output_fields[-1])
    try:
        return cls(metric=metric, **params)
    except TypeError as exc:
        raise OptimizeError(f"optimize.params: {recipe.optimize.optimizer} rejects them: {exc}") \
            from None


def init_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The optimize.params an optimizer's constructor takes. The others must be compile()'s
    (MIPROv2's num_trials, minibatch, data_aware_proposer, ...); a key neither takes is an
    error naming both lists (usercode.param_problem)."""
    problem = param_problem(cls, params)
    if problem:
        raise OptimizeError(f"optimize.params: {problem}")
    init, compile_ = optimizer_params(cls)
    return {k: v for k, v in params.items() if k in init or k not in compile_}


def compile_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The optimize.params only compile() takes (see init_params)."""
    init = init_params(cls, params)
    return {k: v for k, v in params.items() if k not in init}


def compile_program(optimizer: Any, program: dspy.Module, trainset: list[dspy.Example],
                    valset: list[dspy.Example],
                    params: dict[str, Any] | None = None) -> dspy.Module:
    accepted = inspect.signature(optimizer.compile).parameters
    kwargs: dict[str, Any] = {"trainset": trainset, **(params or {})}
    if "valset" in accepted:
        kwargs["valset"] = valset
    if "requires_permission_to_run" in accepted:  # MIPROv2 asks on stdin otherwise
        kwargs["requires_permission_to_run"] = False
    return optimizer.compile(program, **kwargs)


def demo_count(program: dspy.Module) -> int:
    """Demos the program shows its model per call (a retrieved-demos program: k)."""
    return (sum(len(p.demos) for p in program.predictors())
            + len(program.predictors()) * getattr(program, "retrieved_k", 0))


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
    val_errors: dict[str, int] = field(default_factory=dict)  # failed calls per candidate on val
    lm_errors: int = 0  # failed LM calls while the optimizer ran (its own evaluations)

    def summary(self) -> dict[str, Any]:
        optimized = demo_count(self.optimized) if self.optimized is not None else None
        return {"winner": self.winner, "val_scores": self.val_scores, "demos": self.demos,
                "optimized_demos": optimized, "seconds": round(self.seconds, 2),
                "val_errors": self.val_errors, "lm_errors": self.lm_errors,
                "kept": program_view(self.program),
                "candidates": optimizer_candidates(self.optimized),
                "optimizer_pick": program_view(self.optimized)
                if self.optimized is not None else None,
                **({"retrieved": info} if (info := retrieved_info(self.optimized)) else {})}


def program_view(program: dspy.Module) -> list[dict[str, Any]]:
    """What a program says to its model, per predictor: its instruction and its demos."""
    return [{"predictor": name, "instructions": predictor.signature.instructions,
             "demos": [{k: str(v) for k, v in dict(demo).items()
                        if not k.startswith("augmented")} for demo in predictor.demos]}
            for name, predictor in program.named_predictors()]


def beyond_margin(val_scores: dict[str, float], margin: float) -> list[str]:
    """The candidates the guard may keep: "plain", and those that beat it on val by more than
    margin. On a small val split one row is noise (30 rows: 3.3 points a row), so a recipe can
    ask for more than any gain (docs/studies.md, data_size)."""
    if margin <= 0:
        return list(val_scores)
    floor = val_scores["plain"] + margin + 1e-9  # 1e-9: a gain equal to the margin is not more
    return [n for n, score in val_scores.items() if n == "plain" or score > floor]


def prompt_optimize(recipe: Recipe, program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter,
                    trainset: list[dspy.Example], valset: list[dspy.Example],
                    metric: Callable[..., Any], extra: dict[str, dspy.Module] | None = None,
                    emit: Emit = print, log_path: Path | None = None,
                    proposer: dspy.LM | None = None, teacher: dspy.LM | None = None,
                    log_dir: Path | None = None) -> PromptResult:
    """Run the recipe's optimizer, then keep the best on val of: plain, optimized, extras.

    Ties go to the program with fewer demos (cheaper, and what the fine-tune saw). Failed LM
    calls are counted (the optimizer's and the val scoring's); on val, more than
    evaluate.max_errors for a candidate fails the stage: a candidate must not win or lose on
    calls that never returned.
    """
    start = time.time()
    threads = recipe.optimize.num_threads
    counter = LMErrorCounter()
    callbacks = [*dspy.settings.callbacks, counter]
    with dspy.context(lm=lm, adapter=adapter, callbacks=callbacks):
        candidates: dict[str, dspy.Module] = {"plain": program.deepcopy()}
        candidates.update(extra or {})
        emit(f"  {recipe.optimize.optimizer} on {len(trainset)} train / {len(valset)} val"
             + (f" (its log: {log_path})" if log_path else ""))
        with dspy_chatter_to(log_path):
            if recipe.optimize.optimizer == RETRIEVED:  # nothing to search: demos per input
                candidates["optimized"] = retrieved_program(
                    program, trainset, dict(recipe.optimize.params), ranking_model(recipe))
            else:
                optimizer = build_optimizer(recipe, metric, lm, proposer, teacher, log_dir)
                try:
                    candidates["optimized"] = compile_program(
                        optimizer, program.deepcopy(), trainset, valset,
                        compile_params(type(optimizer), dict(recipe.optimize.params)))
                except Exception:
                    raise_metric_fault(metric)
                    raise
                raise_metric_fault(metric)
        if counter.errors:
            emit(f"  warning: {counter.errors} LM calls failed while the optimizer ran "
                 f"(first: {counter.first}); it scored them as wrong answers")
        if not recipe.optimize.guard:
            chosen = candidates["optimized"]
            return PromptResult(chosen, "optimized", {}, demo_count(chosen), time.time() - start,
                                chosen, lm_errors=counter.errors)
        scored: dict[str, Scored] = {}
        with dspy_chatter_to(log_path):
            for name, candidate in candidates.items():
                try:
                    scored[name] = evaluate_program(candidate, valset, metric, threads,
                                                    recipe.evaluate.max_errors)
                except ScoreError as exc:
                    raise OptimizeError(
                        f"prompt stage, candidate '{name}' on val: {exc}. Fix the model or "
                        "server, or raise evaluate.max_errors to score failed calls as wrong "
                        "answers") from None
    val_scores = {name: s.mean for name, s in scored.items()}
    val_errors = {name: s.errors for name, s in scored.items()}
    margin = recipe.optimize.guard_margin
    best = max(beyond_margin(val_scores, margin),
               key=lambda n: (val_scores[n], -demo_count(candidates[n]), n == "plain"))
    emit("  val: " + ", ".join(f"{n} {s:.3f}" for n, s in val_scores.items())
         + f" -> {best}" + (f" (guard_margin {margin:g})" if margin else ""))
    if any(val_errors.values()):
        emit("  warning: failed calls on val (scored as wrong answers): "
             + ", ".join(f"{n} {e}" for n, e in val_errors.items() if e))
    chosen = candidates[best]
    return PromptResult(chosen, best, val_scores, demo_count(chosen), time.time() - start,
                        candidates["optimized"], val_errors, counter.errors)
