"""The optimize stage: prompt-optimize the task program on the base model (prompt_only) and on
the merged model (combined), and save each program with DSPy's own save.

With `optimize.order: p->w` the pipeline calls `prompt_first` before the render stage writes
the training rows (they carry the demos it chose). With an `optimize.strategy` other than
"w -> p", the combined arm is BetterTogether's (copa.stages.strategy). `combined_arm` is the
combined arm's one code path: this stage and COPAOptimizer.compile both call it, so every
optimize: key means the same through either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from copa.dspy.candidates import candidate_table, kept_demos_text
from copa.dspy.kit import TaskKit, base_model_path, run_retriever, task_kit
from copa.dspy.lms import in_process, model_lm, role_lm
from copa.dspy.search import PromptResult, prompt_optimize, with_demos
from copa.files import atomic_write_json
from copa.prompting import field_value
from copa.recipe import Recipe
from copa.recipe.schema import DEFAULT_STRATEGY


def _save_program(program: dspy.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.json")  # DSPy infers the format from .json
    program.save(str(tmp))
    os.replace(tmp, path)


def _optimize_arm(run: Any, kit: TaskKit, arm: str, model_path: str, lm_name: str,
                  extra: dict[str, dspy.Module], out: Path | None = None
                  ) -> tuple[PromptResult, dspy.LM | None]:
    """Prompt-optimize one arm's program on one model and save it as program_<arm>.json in
    `out` (the run's optimize folder unless given). With it, the LM the program answers with
    where that outlives the step (an in-process engine), else None."""
    recipe: Recipe = run.recipe
    out = out or run.optimize_dir
    out.mkdir(parents=True, exist_ok=True)
    run.emit(f"  [{arm}] prompt optimization on the {lm_name} model")
    lasting = None
    if recipe.optimize.enabled:
        base = base_model_path(recipe)
        merged = str(run.merged) if run.finetunes and run.merged.is_dir() else None
        opt = recipe.optimize
        with model_lm(recipe, model_path, lm_name, run.dir, emit=run.emit) as lm, \
                role_lm(recipe, opt.proposer, "proposer", base, merged) as proposer, \
                role_lm(recipe, opt.teacher, "teacher", base, merged) as teacher:
            result = prompt_optimize(recipe, kit.program, lm, kit.adapter, kit.trainset,
                                     kit.valset, kit.metric, extra, emit=run.emit,
                                     log_path=out / f"dspy-{arm}.log", proposer=proposer,
                                     teacher=teacher, log_dir=out / f"optimizer-{arm}")
            lasting = lm if in_process(recipe) else None
        summary = result.summary()
        # the optimizer's pick's retrieval settings, when the guard kept that pick
        retrieved = summary.get("retrieved") if result.winner == "optimized" else None
        for view in summary["kept"]:
            run.emit(f"  kept instruction ({view['predictor']}): "
                     f"{' '.join(view['instructions'].split())[:200]!r}, "
                     f"{kept_demos_text(view, retrieved)}")
        candidates = summary["candidates"]
        if candidates:
            run.emit(f"  the optimizer scored {len(candidates)} candidates on val:")
            for line in candidate_table(candidates):
                run.emit(f"    {line}")
    else:
        result = PromptResult(kit.program.deepcopy(), "plain")
    _save_program(result.program, out / f"program_{arm}.json")
    pick = out / f"program_{arm}_pick.json"
    if result.optimized is not None and result.winner != "optimized":
        # The guard declined the optimizer's pick: evaluate scores it on test beside the kept
        # program, the evidence guard_margin's default is decided on (copa.stages.val).
        _save_program(result.optimized, pick)
    else:
        pick.unlink(missing_ok=True)
    return result, lasting


@dataclass
class CombinedArm:
    result: PromptResult  # the program kept (its LMs set under a strategy) and how it was chosen
    summary: dict[str, Any]  # the arm's entry in optimize.json
    lm: dspy.LM | None  # the LM the program answers with, where that outlives the step


def combined_arm(run: Any, kit: TaskKit, out: Path) -> CombinedArm:
    """The combined arm's prompt step on the merged model, saved in `out`: the recipe's
    optimizer (optimize.optimizer, params, proposer, teacher, max_tokens), the val guard
    (guard, guard_margin) with the fine-tune's own demo set as a candidate; or, under an
    optimize.strategy, BetterTogether's pick."""
    recipe: Recipe = run.recipe
    if recipe.optimize.strategy != DEFAULT_STRATEGY:
        from copa.stages.strategy import strategy_arm  # BetterTogether: its own "p" and "w"

        program, summary = strategy_arm(run, kit, _save_program, out)
        return CombinedArm(PromptResult(program, summary["winner"], summary["val_scores"],
                                        summary["demos"], summary["seconds"]), summary, None)
    extra = {}
    fixed_demos = json.loads((run.rendered / "demos.json").read_text())
    if fixed_demos:
        # The demo set the model was fine-tuned with is a candidate of its own.
        extra["finetune_demos"] = with_demos(kit.program, fixed_demos, recipe)
    result, lm = _optimize_arm(run, kit, "combined", str(run.merged), "merged", extra, out)
    return CombinedArm(result, result.summary(), lm)


def kit_for(run: Any) -> TaskKit:
    """The optimizer's train and val rows: the rendered splits and nothing else, so it sees the
    very rows the test split was held out from (never a fresh load of an edited data file)."""
    from copa.data import read_jsonl

    splits = run.rendered / "splits"
    return task_kit(run.recipe, read_jsonl(splits / "train.jsonl"),
                    read_jsonl(splits / "val.jsonl"), run.checked.spec,
                    retriever=run_retriever(run.recipe, run.rendered))


def prompt_first(run: Any) -> list[dict[str, str]]:
    """The "p" of "p -> w": optimize prompts on the base model before fine-tuning; the demo set
    the optimizer chose goes into every training row (copa.pipeline calls it before render)."""
    kit = kit_for(run)
    result, _ = _optimize_arm(run, kit, "prompt_only", base_model_path(run.recipe), "base", {})
    atomic_write_json(run.optimize_dir / "prompt_first.json", result.summary())
    fields = set(kit.spec.input_fields) | set(kit.spec.output_fields)
    source = result.optimized if result.optimized is not None else result.program
    demos = [{k: field_value(v) for k, v in dict(d).items() if k in fields}
             for p in source.predictors() for d in p.demos]
    return [d for d in demos if set(d) == fields]


def optimize_stage(run: Any) -> dict[str, Any]:
    """Pipeline stage: prompt-optimize on the base model (prompt_only) and on the merged model
    (combined); save both programs with DSPy's own save and a summary."""
    recipe: Recipe = run.recipe
    out: Path = run.optimize_dir
    kit = kit_for(run)
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
                                                   base_model_path(recipe), "base", {})[0].summary()
        artifacts["prompt_only"] = str(out / "program_prompt_only.json")
    if "combined" in arms and run.finetunes:
        summary["combined"] = combined_arm(run, kit, out).summary
        artifacts["combined"] = str(out / "program_combined.json")
    atomic_write_json(out / "optimize.json", summary)
    return {"programs": artifacts, "summary": str(out / "optimize.json")}
