"""One arm of a finished run, as copa.load, predict, serve and export read it: its recipe, prompt
template, saved program and model folder, from a run directory or a `copa export` folder.

Loads no model and no heavy library, so a directory is checked (and refused, with what to do)
before anything slow starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copa.prompting import PromptSpec, PromptTemplate, default_instructions
from copa.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_read_back
from copa.registry import ARMS, DEMO_ARM, OPTIMIZED_ARMS, RECIPE_ARMS
from copa.stages.val import best_arm, demo_count, val_scores_from_optimize

EXPORT_MANIFEST = "copa-export.json"
EXPORT_FORMAT = 1
KNOWN_ARMS = (*RECIPE_ARMS, DEMO_ARM)  # a run that fine-tuned with demos reports demo_finetune too


class NotFinished(Exception):
    """The directory holds no usable result for the arm asked for; the message says what to do
    (the CLI exits 2 with it)."""


@dataclass(frozen=True)
class Bundle:
    """What one arm needs to answer: recipe, template text, program file and model."""

    root: Path
    kind: str  # "run" or "export"
    arm: str
    recipe: Recipe
    template_text: str
    model_path: str  # a model folder (or a hub id, for a base model given as one)
    model_role: str  # "base" or "merged"
    program_path: Path | None  # None: the recipe's plain program
    val: dict[str, Any] = field(default_factory=dict)  # scores by arm, best_arm
    report: dict[str, Any] | None = None

    @property
    def input_fields(self) -> list[str]:
        return list(self.recipe.task.input_fields)

    @property
    def output_fields(self) -> list[str]:
        """The program's outputs (ChainOfThought's reasoning first)."""
        outputs = list(self.recipe.task.output_fields)
        return ["reasoning", *outputs] if self.recipe.task.module == "chain_of_thought" \
            else outputs

    def spec(self) -> PromptSpec:
        """The prompt template the run used (its text as recorded, not the file as it is now)."""
        task = self.recipe.task
        template = PromptTemplate.from_string(self.template_text,
                                              f"{self.root} ({self.kind}) template")
        return PromptSpec(template, task.instructions or default_instructions(
            task.input_fields, task.output_fields), tuple(task.input_fields),
            tuple(self.output_fields), tuple(task.choices) if task.choices else None)


def open_bundle(path: str | Path, arm: str = "best") -> Bundle:
    """The arm `arm` ("best" = the best on val) of a run directory or an exported folder."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise NotFinished(f"{path}: no such directory (give a run directory such as runs/iris, "
                          "or a folder written by `copa export`)")
    if arm != "best" and arm not in KNOWN_ARMS:
        raise NotFinished(f"unknown arm '{arm}': use best, {', '.join(KNOWN_ARMS)}")
    if (root / EXPORT_MANIFEST).is_file():
        return _open_export(root, arm)
    if (root / "manifest.json").is_file():
        return _open_run(root, arm)
    raise NotFinished(f"{path} is neither a copa run directory (it has no manifest.json) nor a "
                      f"folder written by `copa export` (no {EXPORT_MANIFEST})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NotFinished(f"{path}: unreadable ({exc})") from None


def _run_recipe(root: Path, manifest: dict[str, Any]) -> tuple[Recipe, str]:
    """The recipe and template a run's results came from: recipe.json (written by evaluate),
    else, for a run from before it existed, the recipe file the manifest names."""
    used = root / "recipe.json"
    if used.is_file():
        data = _read_json(used)
        source = Path(data["source_path"]) if data.get("source_path") else None
        recipe = recipe_from_dict(recipe_read_back(data["recipe"]), str(used), source_path=source)
        return recipe, data["template"]
    recipe_file = manifest.get("recipe")
    if not recipe_file or not Path(recipe_file).is_file():
        raise NotFinished(f"{root}: the run has no recipe.json and its recipe file "
                          f"({recipe_file or 'not recorded'}) is gone; re-run `copa evaluate` "
                          "with the recipe to record it")
    from copa.prompting import spec_from_recipe

    recipe = load_recipe(recipe_file)
    return recipe, spec_from_recipe(recipe).template.text


def _stage_done(manifest: dict[str, Any], stage: str) -> bool:
    return manifest.get("stages", {}).get(stage, {}).get("status") == "done"


def _run_val(root: Path, report: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    """report.json's val section; for a report from before it, the scores optimize.json holds
    (all of them are needed: `best` is never chosen among some arms only)."""
    if report.get("val", {}).get("best_arm"):
        return report["val"]
    optimize = root / "optimize" / "optimize.json"
    known = val_scores_from_optimize(_read_json(optimize) if optimize.is_file() else {})
    missing = [a for a in arms if a not in known]
    if missing:
        raise NotFinished(f"{root}: no val score for {', '.join(missing)} (the report predates "
                          "val scores for every arm): re-run `copa evaluate RECIPE --force`, or "
                          "name an arm (--arm)")
    scores = {a: known[a] for a in arms}
    demos = {a: _program_demos(root, a) for a in arms}
    return {"scores": scores, "best_arm": best_arm(scores, demos), "from": "optimize.json"}


def _program_demos(root: Path, arm: str) -> int:
    path = root / "optimize" / f"program_{arm}.json"
    return demo_count(_read_json(path)) if arm in OPTIMIZED_ARMS and path.is_file() else 0


def _open_run(root: Path, arm: str) -> Bundle:
    manifest = _read_json(root / "manifest.json")
    name = manifest.get("name", root.name)
    if not _stage_done(manifest, "evaluate"):
        status = manifest.get("stages", {}).get("evaluate", {}).get("status", "not run")
        raise NotFinished(f"{root}: the run is not finished (evaluate: {status}); finish it "
                          f"with `copa run {manifest.get('recipe', 'RECIPE')}` (recipe {name})")
    try:
        recipe, template = _run_recipe(root, manifest)
    except RecipeError as exc:
        raise NotFinished(f"{root}: its recipe no longer loads: {exc}") from None
    report = _read_json(root / "report.json") if (root / "report.json").is_file() else {}
    arms = [a for a, data in report.get("arms", {}).items() if not data.get("failed")]
    try:
        val = _run_val(root, report, arms)
    except NotFinished:
        if arm == "best":
            raise
        val = {}  # an arm named outright needs no val scores
    chosen = val["best_arm"] if arm == "best" else arm
    if chosen not in arms:
        raise NotFinished(f"{root}: arm '{chosen}' has no result in this run (arms with one: "
                          f"{', '.join(arms) or 'none'})")
    role = ARMS[chosen].model
    if role == "merged":
        # fine-tune-only runs on plain/merged where the run also fine-tuned with demos
        model = root / (report.get("arms", {}).get(chosen, {}).get("model_dir") or "merged")
        if not (model / "config.json").is_file():
            raise NotFinished(f"{root}: the merged model ({model}) is missing: re-run "
                              "`copa merge RECIPE`")
        model_path = str(model)
    else:
        from copa.models import resolve_model

        model_path = resolve_model(recipe.model.base, recipe.base_dir)
    program = root / "optimize" / f"program_{chosen}.json" if chosen in OPTIMIZED_ARMS else None
    if program is not None and not program.is_file():
        raise NotFinished(f"{root}: {program.name} is missing: re-run `copa optimize RECIPE`")
    return Bundle(root=root, kind="run", arm=chosen, recipe=recipe, template_text=template,
                  model_path=model_path, model_role=role, program_path=program, val=val,
                  report=report)


def _open_export(root: Path, arm: str) -> Bundle:
    info = _read_json(root / EXPORT_MANIFEST)
    if info.get("format") != EXPORT_FORMAT:
        raise NotFinished(f"{root}: export format {info.get('format')} is not {EXPORT_FORMAT}, "
                          "the one this copa reads; export the run again with this copa")
    if arm not in ("best", info["arm"]):
        raise NotFinished(f"{root}: this export holds arm '{info['arm']}' only; export arm "
                          f"'{arm}' from the run directory (`copa export RUN_DIR OUT --arm {arm}`)")
    missing = [info[k] for k in ("recipe", "template", "program", "model")
               if not (root / info[k]).exists()]
    if missing:
        raise NotFinished(f"{root}: incomplete export, missing {', '.join(missing)}")
    try:
        recipe = load_recipe(root / info["recipe"], written=True)
    except RecipeError as exc:
        raise NotFinished(f"{root}: its recipe does not load: {exc}") from None
    report = _read_json(root / "report.json") if (root / "report.json").is_file() else None
    return Bundle(root=root, kind="export", arm=info["arm"], recipe=recipe,
                  template_text=(root / info["template"]).read_text(encoding="utf-8"),
                  model_path=str(root / info["model"]), model_role=info["model_role"],
                  program_path=root / info["program"], val=info.get("val", {}), report=report)
