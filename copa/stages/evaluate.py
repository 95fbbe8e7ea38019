"""The four arms on the held-out test split, with paired bootstrap confidence intervals.

baseline      base model,   plain program
prompt_only   base model,   prompt-optimized program
finetune_only merged model, plain program
combined      merged model, prompt-optimized program (optimized on the merged model)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from copa import precision

ARM_MODELS = {"baseline": "base", "prompt_only": "base", "finetune_only": "merged",
              "combined": "merged"}


def arm_key(run: Any, arm: str, program: Any, model_dir: str | None = None) -> str:
    """What an arm's predictions depend on: its program (demos, instructions), its model, the
    test rows, the prompt template and the evaluation settings. model_dir: a model the
    optimize stage chose (a strategy's pick), keyed with that stage's key."""
    from copa.files import sha256_file, sha256_json

    recipe = run.recipe
    model = "base" if ARM_MODELS[arm] == "base" else run.keys.get("merge", "merged")
    if model_dir is not None:
        model = [model_dir, run.keys.get("optimize")]
    settings = recipe.model_dump(mode="json")["evaluate"]
    settings.pop("max_errors")  # the error budget changes no prediction
    serve = recipe.model_dump(mode="json")["serve"]
    serve.pop("precision")  # keyed as resolved on this machine (auto), and only where not fp32
    return sha256_json([arm, json.dumps(program.dump_state(), sort_keys=True, default=str),
                        model, recipe.model.base, run.checked.spec.template.text, settings,
                        serve, *precision.key_part(recipe.serve.precision),
                        recipe.task.signature,
                        recipe.optimize.adapter,
                        sha256_file(run.rendered / "splits" / "test.jsonl"),
                        # a RAG program's answers depend on what it retrieves
                        *([recipe.model_dump(mode="json")["retrieve"]] if recipe.retrieve else [])])


class EvaluateError(Exception):
    """An arm's failed calls went over evaluate.max_errors: its score would not be a result."""


def _cached_scores(folder: Path, arm: str, key: str) -> list[float] | None:
    key_file, rows_file = folder / f"{arm}.key", folder / f"{arm}.jsonl"
    if not (key_file.is_file() and rows_file.is_file()):
        return None
    if key_file.read_text().strip() != key:
        return None
    return [float(json.loads(line)["score"]) for line in rows_file.read_text().splitlines()
            if line.strip()]


def _program_for(run: Any, arm: str, kit: Any) -> Any:
    if arm in ("baseline", "finetune_only"):
        return kit.program.deepcopy()
    path = run.optimize_dir / f"program_{arm}.json"
    program = kit.program.deepcopy()
    program.load(str(path))
    return program


def _unfair_synergy_reason(run: Any) -> str | None:
    """Why synergy would compare against a crippled arm, or None: when every training row
    carried demos (finetune.demos: fixed, optimize.order: p->w), the fine-tune-only arm is a
    model trained to see demos, prompted without them; combined - max(single arms) would then
    credit the prompt stage with putting back what the fine-tune-only arm's prompt took away."""
    if not run.finetunes:
        return None
    demos = json.loads((run.rendered / "demos.json").read_text())
    if not demos:
        return None
    recipe = run.recipe
    why = ("optimize.order: p->w" if recipe.optimize.order == "p->w"
           else f"finetune.demos: {recipe.finetune.demos}")
    return (f"the model was fine-tuned with {len(demos)} demos in every training row ({why}), "
            "and the fine-tune-only arm prompts it without them, so it is not a fair weights-only "
            "arm; compare with a run fine-tuned demo-free on the same rows (finetune.demos: none, "
            "optimize.order: w->p)")


def _training_curve(run: Any) -> dict[str, Any] | None:
    """finetune.eval's val curve (copa.backends.valcurve), when training measured one."""
    path = run.manifest.stage("train").get("artifacts", {}).get("val_curve")
    if not run.finetunes or not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def evaluate_stage(run: Any) -> dict[str, Any]:
    """Pipeline stage: run each arm on the test split, write predictions and the report."""
    import time

    import dspy

    from copa.data import read_jsonl, write_jsonl
    from copa.dspy.kit import base_model_path, model_lm, run_retriever, task_kit
    from copa.dspy.program import to_examples
    from copa.dspy.search import ScoreError, dspy_chatter_to, evaluate_program
    from copa.files import atomic_write_text
    from copa.runs import versions
    from copa.stages.report import write_report
    from copa.stages.report_html import sent_prompts
    from copa.stats import not_comparable, summarize

    recipe = run.recipe
    kit = task_kit(recipe, [], [], run.checked.spec,
                   retriever=run_retriever(recipe, run.rendered))
    test_rows = read_jsonl(run.rendered / "splits" / "test.jsonl")
    testset = to_examples(recipe, test_rows)
    arms = [a for a in recipe.evaluate.arms if run.finetunes or ARM_MODELS[a] == "base"]
    per_arm: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    failed_arms: dict[str, str | None] = {}  # arm -> first error, for arms whose every call failed
    seconds: dict[str, float] = {}
    tokens: dict[str, int | None] = {}  # answer tokens each arm generated (local engine only)
    predictions_dir = run.dir / "predictions"
    field = recipe.task.output_fields[-1]
    optimize_info = {}
    opt_path = run.optimize_dir / "optimize.json"
    if opt_path.is_file():
        optimize_info = json.loads(opt_path.read_text())
    for arm in arms:
        model_path = base_model_path(recipe) if ARM_MODELS[arm] == "base" else str(run.merged)
        # optimize.strategy: the combined arm runs on the model of BetterTogether's pick
        chosen = optimize_info.get(arm, {}).get("model")
        if chosen:
            model_path = chosen
        program = _program_for(run, arm, kit)
        key = arm_key(run, arm, program, chosen)
        cached = _cached_scores(predictions_dir, arm, key)
        if cached is not None:
            # Same program, model, test rows and settings as last time: the same predictions.
            per_arm[arm], seconds[arm], errors[arm], tokens[arm] = cached, 0.0, 0, None
            run.emit(f"  {arm:<14} {sum(cached) / len(cached):.3f}  (unchanged, from "
                     f"predictions/{arm}.jsonl)")
            continue
        (predictions_dir / f"{arm}.key").unlink(missing_ok=True)  # new predictions come
        start, tokens_before = time.time(), _generated_tokens(recipe)
        try:
            with model_lm(recipe, model_path, ARM_MODELS[arm], run.dir, emit=run.emit) as lm, \
                    dspy.context(lm=lm, adapter=kit.adapter), \
                    dspy_chatter_to(run.dir / "predictions" / "dspy-evaluate.log"):
                scored = evaluate_program(program, testset, kit.metric,
                                          recipe.evaluate.num_threads, recipe.evaluate.max_errors)
        except ScoreError as exc:
            raise EvaluateError(
                f"evaluate: arm '{arm}': {exc}. Fix the model or server (its log: "
                f"{run.dir / 'predictions' / 'dspy-evaluate.log'}), or raise evaluate.max_errors "
                "to score failed calls as wrong answers") from None
        seconds[arm] = round(time.time() - start, 2)
        after = _generated_tokens(recipe)
        tokens[arm] = None if after is None or tokens_before is None else after - tokens_before
        results = scored.results
        per_arm[arm], errors[arm] = [float(s) for _, _, s in results], scored.errors
        if scored.all_failed:
            failed_arms[arm] = scored.first_error
            run.emit(f"  {arm:<14} FAILED: all {len(results)} calls failed "
                     f"(first: {scored.first_error})")
        else:
            failures = f", {scored.errors} failed calls scored 0" if scored.errors else ""
            run.emit(f"  {arm:<14} {scored.mean:.3f}  ({len(results)} test rows{failures}, "
                     f"{seconds[arm]:.0f}s)")
        write_jsonl(predictions_dir / f"{arm}.jsonl", [
            {"inputs": {f: ex[f] for f in recipe.task.input_fields}, "gold": ex[field],
             "prediction": getattr(pred, field, None) if pred is not None else None,
             "score": float(s), **({"error": True} if bad else {})}
            for (ex, pred, s), bad in zip(results, scored.failed, strict=True)])
        if not scored.errors:  # a re-run retries failed calls instead of reusing them
            atomic_write_text(predictions_dir / f"{arm}.key", key + "\n")
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
    summary["arms"] = arms_out
    reason = _unfair_synergy_reason(run)
    if reason and "synergy" in summary:
        summary["synergy"] = not_comparable(summary["synergy"], reason)
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
            "finetune_demos": recipe.finetune.demos,
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


def _val_scores(run: Any, kit: Any, arms: list[str],
                optimize_info: dict[str, Any]) -> dict[str, Any]:
    """Every arm's score on the val split: from optimize.json where the optimize stage scored
    it, else scored here (same program, model, adapter and metric as on test)."""
    import dspy

    from copa.data import read_jsonl
    from copa.dspy.kit import base_model_path, model_lm
    from copa.dspy.program import to_examples
    from copa.dspy.search import demo_count, dspy_chatter_to, evaluate_program
    from copa.stages.val import val_scores_from_optimize, val_section

    recipe = run.recipe
    valset = to_examples(recipe, read_jsonl(run.rendered / "splits" / "val.jsonl"))
    known = val_scores_from_optimize(optimize_info)
    scores: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    demos: dict[str, int] = {}
    for arm in arms:
        program = _program_for(run, arm, kit)
        demos[arm] = demo_count(program)
        if arm in known:
            scores[arm], sources[arm] = known[arm], "optimize"
            continue
        model_path = base_model_path(recipe) if ARM_MODELS[arm] == "base" else str(run.merged)
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
    if recipe.serve.engine != "local":
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
