"""COPAOptimizer: fine-tune first (Axolotl, through the pipeline's backend stages), then optimize
prompts with any DSPy optimizer, choosing on the val split so the prompt stage can never make the
program worse there than the plain (zero-demo) program.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from copa.adapter import TemplateAdapter
from copa.files import atomic_write_json
from copa.metrics import make_metric
from copa.program import make_program, to_examples
from copa.prompting import PromptSpec, spec_from_recipe
from copa.recipe import Recipe

Emit = Callable[[str], None]


class OptimizeError(Exception):
    pass


def resolve_optimizer(name: str) -> type:
    """A DSPy optimizer class by name (dspy.<Name>) or a user's 'package.module:Class'."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    cls = getattr(dspy, name, None) or getattr(dspy.teleprompt, name, None)
    if cls is None or not inspect.isclass(cls):
        raise OptimizeError(f"optimize.optimizer: DSPy has no optimizer named '{name}' "
                            "(e.g. BootstrapFewShot, BootstrapFewShotWithRandomSearch, MIPROv2)")
    return cls


def build_optimizer(recipe: Recipe, metric: Callable[..., Any]) -> Any:
    cls = resolve_optimizer(recipe.optimize.optimizer)
    params = dict(recipe.optimize.params)
    accepted = inspect.signature(cls.__init__).parameters
    if "num_threads" in accepted and "num_threads" not in params:
        params["num_threads"] = recipe.optimize.num_threads
    if "seed" in accepted and "seed" not in params:
        params["seed"] = recipe.finetune.seed
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
                    emit: Emit = print, log_path: Path | None = None) -> PromptResult:
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
            optimizer = build_optimizer(recipe, metric)
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
             spec: PromptSpec | None = None) -> TaskKit:
    spec = spec or spec_from_recipe(recipe)
    return TaskKit(
        recipe=recipe, spec=spec, program=make_program(recipe), adapter=make_adapter(recipe, spec),
        metric=make_metric(recipe.evaluate.metric, recipe.task.output_fields[-1],
                           recipe.task.choices),
        trainset=to_examples(recipe, train_rows), valset=to_examples(recipe, val_rows))


@contextmanager
def model_lm(recipe: Recipe, model_path: str, name: str,
             run_dir: Path | None = None) -> Iterator[dspy.LM]:
    """The DSPy LM for a model folder: the in-process batched engine (loaded once per process),
    or an OpenAI-compatible server that lives exactly as long as this block (recipe.serve).
    With a run directory, the local engine's answers go to DSPy's response cache there
    (run_dir/cache) and a copa-started server logs to run_dir/serve."""
    serve = recipe.serve
    if serve.engine == "local":
        from copa.lm import make_lm

        tag = None
        if serve.response_cache and run_dir is not None:
            from copa.cache import model_fingerprint, use_response_cache

            use_response_cache(run_dir / "cache" / "dspy")
            tag = model_fingerprint(model_path, run_dir / "cache" / "fingerprints.json")[:16]
        yield make_lm(model_path, name, max_batch_size=serve.max_batch_size,
                      batch_wait_ms=serve.batch_wait_ms, max_tokens=recipe.evaluate.max_tokens,
                      prefix_cache=serve.prefix_cache, cache_tag=tag)
        return
    from copa.serve import serving

    if serve.engine == "openai":  # the user's server knows the model by its own id
        name = serve.model or ""
    with serving(serve.engine, model_path, name, api_base=serve.api_base,
                 api_key=serve.api_key, max_tokens=recipe.evaluate.max_tokens,
                 log_dir=run_dir / "serve" if run_dir is not None else None) as lm:
        yield lm


def base_model_path(recipe: Recipe) -> str:
    from copa.models import resolve_model

    return resolve_model(recipe.model.base, recipe.base_dir)


def _save_program(program: dspy.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.json")  # DSPy infers the format from .json
    program.save(str(tmp))
    os.replace(tmp, path)


def _optimize_arm(run: Any, kit: TaskKit, arm: str, model_path: str, lm_name: str,
                  extra: dict[str, dspy.Module]) -> PromptResult:
    """Prompt-optimize one arm's program on one model and save it as program_<arm>.json."""
    recipe: Recipe = run.recipe
    out: Path = run.optimize_dir
    out.mkdir(parents=True, exist_ok=True)
    run.emit(f"  [{arm}] prompt optimization on the {lm_name} model")
    if recipe.optimize.enabled:
        with model_lm(recipe, model_path, lm_name, run.dir) as lm:
            result = prompt_optimize(recipe, kit.program, lm, kit.adapter, kit.trainset,
                                     kit.valset, kit.metric, extra, emit=run.emit,
                                     log_path=out / f"dspy-{arm}.log")
    else:
        result = PromptResult(kit.program.deepcopy(), "plain")
    _save_program(result.program, out / f"program_{arm}.json")
    return result


def _kit_for(run: Any) -> TaskKit:
    splits = run.checked.splits
    return task_kit(run.recipe, list(splits.train), list(splits.val), run.checked.spec)


def prompt_first(run: Any) -> list[dict[str, str]]:
    """The "p" of "p -> w": optimize prompts on the base model before fine-tuning; the demo set
    the optimizer chose goes into every training row (called by the render stage)."""
    kit = _kit_for(run)
    result = _optimize_arm(run, kit, "prompt_only", base_model_path(run.recipe), "base", {})
    atomic_write_json(run.optimize_dir / "prompt_first.json", result.summary())
    fields = set(kit.spec.input_fields) | set(kit.spec.output_fields)
    source = result.optimized if result.optimized is not None else result.program
    demos = [{k: str(v) for k, v in dict(d).items() if k in fields}
             for p in source.predictors() for d in p.demos]
    return [d for d in demos if set(d) == fields]


def optimize_stage(run: Any) -> dict[str, Any]:
    """Pipeline stage: prompt-optimize on the base model (prompt_only) and on the merged model
    (combined); save both programs with DSPy's own save and a summary."""
    recipe: Recipe = run.recipe
    out: Path = run.optimize_dir
    kit = _kit_for(run)
    fixed_demos = json.loads((run.rendered / "demos.json").read_text())
    arms = recipe.evaluate.arms
    summary: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    first = out / "prompt_first.json"
    if "prompt_only" in arms:
        if recipe.optimize.order == "p->w" and run.finetunes and first.is_file():
            # Already optimized on the base model by the render stage ("p" before "w").
            summary["prompt_only"] = json.loads(first.read_text())
        else:
            summary["prompt_only"] = _optimize_arm(run, kit, "prompt_only",
                                                   base_model_path(recipe), "base", {}).summary()
        artifacts["prompt_only"] = str(out / "program_prompt_only.json")
    if "combined" in arms and run.finetunes:
        extra = {}
        if fixed_demos:
            # The demo set the model was fine-tuned with is a candidate of its own.
            extra["finetune_demos"] = with_demos(kit.program, fixed_demos, recipe)
        summary["combined"] = _optimize_arm(run, kit, "combined", str(run.merged), "merged",
                                            extra).summary()
        artifacts["combined"] = str(out / "program_combined.json")
    atomic_write_json(out / "optimize.json", summary)
    return {"programs": artifacts, "summary": str(out / "optimize.json")}


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
                 emit: Emit = print):
        super().__init__()
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

        overrides = {"optimize.order": self.order} if self.order else None
        run = pipeline.open_run(self.recipe_path, run_dir=self.run_dir, emit=self.emit,
                                overrides=overrides)
        run.dir.mkdir(parents=True, exist_ok=True)
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
