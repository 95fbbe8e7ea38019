"""Which model and which program each arm runs, and what its predictions depend on (the
evaluate stage's key per arm); the report's words for both. Data in, data out: no model loads
here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from copa import precision
from copa.registry import ARMS, DEMO_ARM

ARM_MODELS = {name: arm.model for name, arm in ARMS.items()}  # "base" or "merged"


def run_arms(run: Any) -> list[str]:
    """The arms this run reports: the recipe's (those its models allow), and beside
    fine-tune-only the demo-trained model prompted plainly when the fine-tune saw demos."""
    arms = [a for a in run.recipe.evaluate.arms if run.finetunes or ARM_MODELS[a] == "base"]
    if run.trains_plain and "finetune_only" in arms:
        arms.insert(arms.index("finetune_only") + 1, DEMO_ARM)
    return arms


def arm_model_dir(run: Any, arm: str) -> Path | None:
    """The fine-tuned model an arm runs on (None: the base model)."""
    if ARM_MODELS[arm] == "base":
        return None
    return run.plain_merged if arm == "finetune_only" and run.trains_plain else run.merged


def arm_model_path(run: Any, arm: str) -> str:
    from copa.dspy.kit import base_model_path

    folder = arm_model_dir(run, arm)
    return base_model_path(run.recipe) if folder is None else str(folder)


def demo_training(recipe: Any) -> str:
    """What the demo-trained fine-tune's rows carried, in words."""
    demos = recipe.finetune.demos
    if recipe.optimize.order == "p->w":
        return "the demos the base model's prompt optimizer chose (optimize.order: p->w)"
    if demos == "fixed":
        return f"{recipe.finetune.num_demos} fixed demos (finetune.demos: fixed)"
    return f"{demos.pick} train demos, k in [{demos.k[0]}, {demos.k[1]}] per row"


def arm_used(run: Any, arm: str, optimize_info: dict[str, Any]) -> dict[str, Any]:
    """Which model and which prompt an arm used (the report's table says both)."""
    folder = arm_model_dir(run, arm)
    if folder is None:
        model = f"base ({run.recipe.model.base})"
    elif not run.trains_plain:
        model = "fine-tuned (merged)"
    elif arm == "finetune_only":
        model = "demo-free fine-tune (plain/merged)"
    else:
        model = f"demo-trained fine-tune (merged; rows with {demo_training(run.recipe)})"
    info = optimize_info.get(arm) or {}
    if not ARMS[arm].optimized:
        prompt = "plain"
    elif info.get("retrieved"):
        r = info["retrieved"]
        prompt = f"{info.get('winner')}: {r['k']} retrieved demos per input ({r['by']})" \
            if info.get("winner") == "optimized" else f"{info.get('winner')}"
    else:
        prompt = f"{info.get('winner', 'plain')} ({info.get('demos', 0)} demos)"
    if chosen := info.get("model"):
        model = f"BetterTogether's pick ({chosen})"
    return {"model": model, "prompt": prompt,
            "model_dir": None if folder is None else str(folder.relative_to(run.dir))}


def arm_key(run: Any, arm: str, program: Any, model_dir: str | None = None) -> str:
    """What an arm's predictions depend on: its program (demos, instructions), its model, the
    test rows, the prompt template and the evaluation settings. model_dir: a model the
    optimize stage chose (a strategy's pick), keyed with that stage's key."""
    from copa.files import sha256_file, sha256_json

    recipe = run.recipe
    model = "base" if ARM_MODELS[arm] == "base" else run.keys.get("merge", "merged")
    if arm == "finetune_only" and run.trains_plain:
        model = run.keys.get("plain_finetune", "plain")
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
