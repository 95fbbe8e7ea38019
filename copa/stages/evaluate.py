"""The arms on the held-out test split, with paired bootstrap confidence intervals.

baseline      base model,   plain program
prompt_only   base model,   prompt-optimized program
finetune_only merged model, plain program (a demo-free fine-tune: plain/merged when the
              recipe's fine-tune saw demos, so the arm is prompted as it was trained)
combined      merged model, prompt-optimized program (optimized on the merged model)
demo_finetune the demo-trained merged model, plain program (only when the fine-tune saw demos)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copa.registry import ARMS, DEMO_ARM
from copa.stages.arms import ARM_MODELS, arm_key, arm_model_path, arm_used, run_arms
from copa.stages.predictions import PredictionsError, read_predictions, write_predictions


class EvaluateError(Exception):
    """An arm's failed calls went over evaluate.max_errors: its score would not be a result."""


def _cached_scores(folder: Path, arm: str, key: str) -> list[float] | None:
    key_file, rows_file = folder / f"{arm}.key", folder / f"{arm}.jsonl"
    if not (key_file.is_file() and rows_file.is_file()):
        return None
    if key_file.read_text().strip() != key:
        return None
    try:
        return [float(row["score"]) for row in read_predictions(rows_file)]
    except PredictionsError:
        return None  # damaged since: scored again


def _program_for(run: Any, arm: str, kit: Any) -> Any:
    if not ARMS[arm].optimized:
        return kit.program.deepcopy()
    from copa.dspy.retrieved import load_program

    return load_program(kit.program, run.optimize_dir / f"program_{arm}.json", kit.recipe)


def _training_curve(run: Any) -> dict[str, Any] | None:
    """finetune.eval's val curve (copa.backends.valcurve), when training measured one."""
    path = run.manifest.recorded("train").get("artifacts", {}).get("val_curve")
    if not run.finetunes or not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def evaluate_stage(run: Any) -> dict[str, Any]:
    """Pipeline stage: run each arm on the test split, write predictions and the report."""
    from copa.data import read_jsonl
    from copa.dspy.kit import run_retriever, task_kit
    from copa.dspy.program import to_examples
    from copa.runs import versions
    from copa.stages.report import write_report
    from copa.stages.report_html import sent_prompts
    from copa.stats import summarize

    recipe = run.recipe
    kit = task_kit(recipe, [], [], run.checked.spec,
                   retriever=run_retriever(recipe, run.rendered))
    test_rows = read_jsonl(run.rendered / "splits" / "test.jsonl")
    testset = to_examples(recipe, test_rows)
    arms = run_arms(run)
    per_arm: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    failed_arms: dict[str, str | None] = {}  # arm -> first error, for arms whose every call failed
    seconds: dict[str, float] = {}
    tokens: dict[str, int | None] = {}  # answer tokens each arm generated (local engine only)
    predictions_dir = run.dir / "predictions"
    optimize_info = {}
    opt_path = run.optimize_dir / "optimize.json"
    if opt_path.is_file():
        optimize_info = json.loads(opt_path.read_text())
    for arm in arms:
        # optimize.strategy: the combined arm runs on the model of BetterTogether's pick
        chosen = optimize_info.get(arm, {}).get("model")
        scored = _score_on_test(run, kit, testset, arm, arm, _program_for(run, arm, kit), chosen)
        per_arm[arm], seconds[arm], errors[arm], tokens[arm], failed = scored
        if failed is not None:
            failed_arms[arm] = failed
    guard = _guard_check(run, kit, testset, arms, failed_arms, per_arm, optimize_info, seconds)
    # An arm whose every call failed has no score: it is left out of the intervals, the
    # synergy and the gain, and the report marks it failed instead of printing 0.0.
    summary = summarize({a: s for a, s in per_arm.items() if a not in failed_arms},
                        recipe.evaluate.bootstrap, recipe.data.splits.seed)
    arms_out = {}
    for arm in arms:
        if arm in failed_arms:
            arms_out[arm] = {"score": None, "n": len(per_arm[arm]), "ci95": None,
                             "failed": True, "errors": errors[arm],
                             "first_error": failed_arms[arm]}
        else:
            arms_out[arm] = {**summary["arms"][arm], "errors": errors[arm]}
        arms_out[arm].update(arm_used(run, arm, optimize_info))
    summary["arms"] = arms_out
    val = _val_scores(run, kit, [a for a in arms if a not in failed_arms], optimize_info)
    run.emit(f"  best arm on val: {val['best_arm']}" if val["best_arm"] else
             "  no arm has a val score: nothing to choose `best` from")
    # The manifest lists stages in the order they first ran.
    recorded = run.manifest.data.get("stages", {})
    stage_seconds = {name: entry["seconds"] for name, entry in recorded.items()
                     if entry.get("seconds")}
    stage_seconds["evaluate"] = round(sum(seconds.values()), 2)
    report = {
        "recipe": recipe.name,
        "metric": recipe.evaluate.metric,
        "test_rows": len(test_rows),
        **summary,
        "prompt_optimization": optimize_info,
        "val": val,
        **({"guard": guard} if guard else {}),
        **({"training_val": curve} if (curve := _training_curve(run)) else {}),
        "eval_seconds": seconds,
        "eval_tokens": tokens,
        **({"retrieval": _retrieval_report(recipe, kit.program, test_rows)}
           if recipe.retrieve else {}),
        "stage_seconds": stage_seconds,
        "versions": versions(),
        "settings": {
            "model": recipe.model.base, "optimizer": recipe.optimize.optimizer,
            "order": recipe.optimize.order, "strategy": recipe.optimize.strategy,
            "finetune_demos": recipe.model_dump(mode="json")["finetune"]["demos"],
            "adapter": recipe.optimize.adapter, "seed": recipe.finetune.seed,
            "guard": recipe.optimize.guard, "guard_margin": recipe.optimize.guard_margin,
        },
    }
    if testset:  # what the model receives, for report.html: each kept program on one row
        report["prompt_sent"] = sent_prompts(
            {a: _program_for(run, a, kit) for a in arms if a not in failed_arms}, kit.adapter,
            testset[0].toDict())
    paths = write_report(run.dir, report)
    used = write_recipe_used(run)
    return {name: str(p) for name, p in paths.items()} | {
        "predictions": str(predictions_dir), "recipe_used": str(used)}


def _score_on_test(run: Any, kit: Any, testset: list[Any], name: str, arm: str, program: Any,
                   chosen: str | None = None
                   ) -> tuple[list[float], float, int, int | None, str | None]:
    """One program on the test split, on `arm`'s model: per-row scores, seconds, failed calls,
    generated tokens, and the first error when every call failed (else None). Predictions go to
    predictions/<name>.jsonl; an unchanged program, model and test split reuses them."""
    import time

    import dspy

    from copa.dspy.lms import model_lm
    from copa.dspy.scoring import ScoreError, dspy_chatter_to, evaluate_program
    from copa.files import atomic_write_text

    recipe = run.recipe
    predictions_dir = run.dir / "predictions"
    field = recipe.task.output_fields[-1]
    model_path = chosen or arm_model_path(run, arm)
    key = arm_key(run, arm, program, chosen)
    cached = _cached_scores(predictions_dir, name, key)
    if cached is not None:
        # Same program, model, test rows and settings as last time: the same predictions.
        run.emit(f"  {name:<14} {sum(cached) / len(cached):.3f}  (unchanged, from "
                 f"predictions/{name}.jsonl)")
        return cached, 0.0, 0, None, None
    (predictions_dir / f"{name}.key").unlink(missing_ok=True)  # new predictions come
    start, tokens_before = time.time(), _generated_tokens(recipe)
    log = predictions_dir / "dspy-evaluate.log"
    try:
        with model_lm(recipe, model_path, ARM_MODELS[arm], run.dir, emit=run.emit) as lm, \
                dspy.context(lm=lm, adapter=kit.adapter), dspy_chatter_to(log):
            scored = evaluate_program(program, testset, kit.metric,
                                      recipe.evaluate.num_threads, recipe.evaluate.max_errors)
    except ScoreError as exc:
        raise EvaluateError(
            f"evaluate: arm '{name}': {exc}. Fix the model or server (its log: {log}), or "
            "raise evaluate.max_errors to score failed calls as wrong answers") from None
    seconds = round(time.time() - start, 2)
    after = _generated_tokens(recipe)
    tokens = None if after is None or tokens_before is None else after - tokens_before
    results = scored.results
    failed = None
    if scored.all_failed:
        failed = scored.first_error
        run.emit(f"  {name:<14} FAILED: all {len(results)} calls failed "
                 f"(first: {scored.first_error})")
    else:
        failures = f", {scored.errors} failed calls scored 0" if scored.errors else ""
        run.emit(f"  {name:<14} {scored.mean:.3f}  ({len(results)} test rows{failures}, "
                 f"{seconds:.0f}s)")
    write_predictions(predictions_dir / f"{name}.jsonl", [
        {"inputs": {f: ex[f] for f in recipe.task.input_fields}, "gold": ex[field],
         "prediction": getattr(pred, field, None) if pred is not None else None,
         "score": float(s), **({"error": True} if bad else {})}
        for (ex, pred, s), bad in zip(results, scored.failed, strict=True)])
    if not scored.errors:  # a re-run retries failed calls instead of reusing them
        atomic_write_text(predictions_dir / f"{name}.key", key + "\n")
    return [float(s) for _, _, s in results], seconds, scored.errors, tokens, failed


def _guard_check(run: Any, kit: Any, testset: list[Any], arms: list[str],
                 failed_arms: Mapping[str, Any], per_arm: Mapping[str, list[float]],
                 optimize_info: Mapping[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """Where the val guard kept another program than the optimizer's pick, the pick is scored
    on test too (predictions/<arm>_pick.jsonl): never an arm, never in the synergy, but the
    evidence that decides optimize.guard_margin (copa.stages.val.margin_outcomes): what the
    guard's choice gained or lost on test against the pick it declined."""
    from copa.stages.val import guard_entry

    out: dict[str, Any] = {}
    for arm in ("prompt_only", "combined"):
        info = optimize_info.get(arm) or {}
        pick_file = run.optimize_dir / f"program_{arm}_pick.json"
        if arm not in arms or arm in failed_arms or "plain" not in (info.get("val_scores") or {}):
            continue
        pick = per_arm[arm]
        if info.get("winner") != "optimized":
            if not pick_file.is_file():
                continue
            from copa.dspy.retrieved import load_program

            program = load_program(kit.program, pick_file, kit.recipe)
            scores, took, _, _, failed = _score_on_test(run, kit, testset, f"{arm}_pick", arm,
                                                        program)
            seconds[f"{arm}_pick"] = took  # in the stage's time, never an arm's
            if failed is not None:
                continue
            pick = scores
        plain_arm = "baseline" if arm == "prompt_only" else (
            DEMO_ARM if run.trains_plain else "finetune_only")
        plain = per_arm.get(plain_arm) if plain_arm not in failed_arms else None
        out[arm] = guard_entry(info, per_arm[arm], pick, plain, plain_arm,
                               run.recipe.evaluate.bootstrap, run.recipe.data.splits.seed)
    return out


def _val_scores(run: Any, kit: Any, arms: list[str],
                optimize_info: dict[str, Any]) -> dict[str, Any]:
    """Every arm's score on the val split: from optimize.json where the optimize stage scored
    it, else scored here (same program, model, adapter and metric as on test)."""
    import dspy

    from copa.data import read_jsonl
    from copa.dspy.lms import model_lm
    from copa.dspy.program import to_examples
    from copa.dspy.scoring import dspy_chatter_to, evaluate_program
    from copa.dspy.search import demo_count
    from copa.stages.val import val_scores_from_optimize, val_section

    recipe = run.recipe
    valset = to_examples(recipe, read_jsonl(run.rendered / "splits" / "val.jsonl"))
    known = val_scores_from_optimize(optimize_info, plain_model=run.trains_plain)
    scores: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    demos: dict[str, int] = {}
    for arm in arms:
        program = _program_for(run, arm, kit)
        demos[arm] = demo_count(program)
        if arm in known:
            scores[arm], sources[arm] = known[arm], "optimize"
            continue
        model_path = arm_model_path(run, arm)
        with model_lm(recipe, model_path, ARM_MODELS[arm], run.dir, emit=run.emit) as lm, \
                dspy.context(lm=lm, adapter=kit.adapter), \
                dspy_chatter_to(run.dir / "predictions" / "dspy-evaluate.log"):
            scored = evaluate_program(program, valset, kit.metric, recipe.evaluate.num_threads)
        scores[arm] = None if scored.all_failed else scored.mean
        sources[arm] = "evaluate"
        shown = "failed" if scores[arm] is None else f"{scores[arm]:.3f}"
        run.emit(f"  {arm:<14} val {shown} ({len(valset)} val rows)")
    return val_section(scores, sources, len(valset), demos)


def write_recipe_used(run: Any) -> Path:
    """recipe.json in the run directory: the recipe and prompt template the results came from
    (the recipe file may be edited later; copa.load reads this, not the file)."""
    from copa.files import atomic_write_json
    from copa.recipe import recipe_to_write

    path = run.dir / "recipe.json"
    source = run.recipe.source_path
    atomic_write_json(path, {"recipe": recipe_to_write(run.recipe),  # no server keys on disk
                             "source_path": str(source) if source else None,
                             "template": run.checked.spec.template.text})
    return path


def _generated_tokens(recipe: Any) -> int | None:
    """The local engines' generated-token count so far (None: a server generates)."""
    from copa.dspy.lms import in_process

    if not in_process(recipe):
        return None
    from copa.inference.engine import generated_tokens

    return generated_tokens()


def _retrieval_report(recipe: Any, program: Any, test_rows: list[dict[str, Any]]
                      ) -> dict[str, Any]:
    """Retrieval recall@k on the test split: how often a gold answer string is in the k
    passages the program retrieves (a ceiling for answering from them)."""
    from copa.dspy.metrics import answer_found

    retriever, query = program.retriever, program.query_field
    output = recipe.task.output_fields[-1]
    hits = [answer_found(retriever.search(str(row[query])), row.get("answers") or [row[output]])
            for row in test_rows]
    return {"retriever": recipe.retrieve.retriever, "k": recipe.retrieve.k,
            "passages": len(retriever.passages), "n": len(hits),
            "recall_at_k": sum(hits) / len(hits) if hits else 0.0}


def load_report(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "report.json").read_text())
