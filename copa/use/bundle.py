"""One arm of a finished run, as copa.load, predict, serve and export read it: its recipe, prompt
template, saved program and model folder, from a run directory or a `copa export` folder.

Loads no model and no heavy library, so a directory is checked (and refused, with what to do)
before anything slow starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copa.files import DamagedFile, dangling_link, json_keys, read_json_object
from copa.prompting import PromptSpec, PromptTemplate, default_instructions
from copa.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_read_back
from copa.registry import ARMS, DEMO_ARM, OPTIMIZED_ARMS, RECIPE_ARMS
from copa.stages.val import best_arm, demo_count, val_scores_from_optimize
from copa.text import one_line

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
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a run directory or export folder (a str or Path), not "
                        f"{type(path).__name__}")
    if not isinstance(arm, str):
        raise TypeError(f"arm must be a str (best, {', '.join(KNOWN_ARMS)}), not "
                        f"{type(arm).__name__}")
    if not os.fspath(path).strip():  # Path("") is the current folder: say what was given
        raise NotFinished(f"path {os.fspath(path)!r} is empty: give a run directory such as "
                          "runs/iris, or a folder written by `copa export`")
    try:
        root = Path(path).expanduser()
        if root.is_symlink() and not root.exists():
            raise NotFinished(f"{path}: {dangling_link(root)}")
        root = root.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a loop above it, a NUL, a long name
        raise NotFinished(f"{one_line(repr(str(path)), 100)}: not a usable path "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
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


RERUN_EVALUATE = "re-run `copa evaluate RECIPE --force` to write it again"
EXPORT_AGAIN = "export the run again (`copa export RUN_DIR OUT`)"


def _read_json(path: Path, fix: str, **kinds: type | tuple[type, ...]) -> dict[str, Any]:
    """A run's or export's JSON artifact (one object, with `kinds`' keys of their kinds): a
    missing or damaged one is a NotFinished naming the file, how it is damaged and `fix`, read
    before any model loads."""
    try:
        data = read_json_object(path)
    except DamagedFile as exc:
        raise NotFinished(f"{exc}: {fix}") from None
    _keys(data, path, fix, **kinds)
    return data


def _keys(data: dict[str, Any], path: Path, fix: str, **kinds: type | tuple[type, ...]) -> None:
    try:
        json_keys(data, path, **kinds)
    except DamagedFile as exc:
        raise NotFinished(f"{exc}: {fix}") from None


def _damaged(path: Path, what: str, fix: str) -> NotFinished:
    return NotFinished(f"{path}: damaged, {what}: {fix}")


def _model_weights(model: Path, fix: str) -> None:
    """A model folder without its weights (or with a truncated weights file) is refused here,
    not by transformers' traceback once the model loads."""
    from copa.model_checks import weights_problem

    problem = weights_problem(model)
    if problem:
        raise NotFinished(f"{problem}: {fix}")


def _run_recipe(root: Path, manifest: dict[str, Any]) -> tuple[Recipe, str]:
    """The recipe and template a run's results came from: recipe.json (written by evaluate),
    else, for a run from before it existed, the recipe file the manifest names."""
    used = root / "recipe.json"
    if used.is_file():
        data = _read_json(used, RERUN_EVALUATE, recipe=dict, template=str)
        source = data.get("source_path")
        source = Path(source) if isinstance(source, str) and source else None
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


def _stage_status(manifest: dict[str, Any], stage: str) -> str:
    """'done', 'running', 'failed', 'not run', or 'stale (train ran again since)'."""
    info = manifest.get("stages", {}).get(stage, {})
    if not isinstance(info, dict):
        return "not run"
    status = str(info.get("status", "not run"))
    since = info.get("stale_since")
    if status == "stale" and isinstance(since, list) and since:
        status += f" ({', '.join(map(str, since))} ran again since)"
    return status


def _run_val(root: Path, report: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    """report.json's val section; for a report from before it, the scores optimize.json holds
    (all of them are needed: `best` is never chosen among some arms only)."""
    if report.get("val", {}).get("best_arm"):
        return report["val"]
    optimize = root / "optimize" / "optimize.json"
    known = val_scores_from_optimize(_read_json(optimize, "re-run `copa optimize RECIPE --force`")
                                     if optimize.is_file() else {})
    missing = [a for a in arms if a not in known]
    if missing:
        raise NotFinished(f"{root}: no val score for {', '.join(missing)} (the report predates "
                          "val scores for every arm): re-run `copa evaluate RECIPE --force`, or "
                          "name an arm (--arm)")
    scores = {a: known[a] for a in arms}
    demos = {a: _program_demos(root, a) for a in arms}
    if all(score is None for score in scores.values()):  # best_arm's ValueError, said here
        raise NotFinished(f"{root}: no arm has a val score to choose `best` by: name an arm "
                          "(--arm)")
    return {"scores": scores, "best_arm": best_arm(scores, demos), "from": "optimize.json"}


def _program_demos(root: Path, arm: str) -> int:
    path = root / "optimize" / f"program_{arm}.json"
    return demo_count(_read_json(path, "re-run `copa optimize RECIPE --force`")) \
        if arm in OPTIMIZED_ARMS and path.is_file() else 0


def _report(path: Path, fix: str) -> dict[str, Any]:
    """report.json with what copa.use reads from it as evaluate wrote it: the metric, the test
    rows, each arm's score and interval (or failed), the val section an object."""
    report = _read_json(path, fix, arms=dict, metric=str, test_rows=int)
    for arm, data in report["arms"].items():
        if not isinstance(data, dict):
            raise _damaged(path, f"arm '{arm}' is not an object", fix)
        ci95 = data.get("ci95")
        if not data.get("failed") and not (
                isinstance(data.get("score"), (int, float)) and isinstance(ci95, list)
                and len(ci95) == 2 and all(isinstance(x, (int, float)) for x in ci95)):
            raise _damaged(path, f"arm '{arm}' has no score and 95% interval", fix)
    if not isinstance(report.get("val", {}), dict):
        raise _damaged(path, "'val' is not an object", fix)
    return report


def _run_manifest(root: Path) -> dict[str, Any]:
    return _read_json(root / "manifest.json", "the run directory is damaged: run its recipe "
                      "again into a new run directory (`copa run RECIPE --run-dir NEW`)",
                      stages=dict)


def check_finished(root: Path) -> None:
    """A run directory whose evaluate stage is not done (never run, failed, or stale: a stage
    before it ran again since) is a NotFinished saying so: its report, program and scores are
    not this run's. A folder without manifest.json (an export) has no stages to check."""
    if (root / "manifest.json").exists():
        _check_evaluated(root, _run_manifest(root))


def _check_evaluated(root: Path, manifest: dict[str, Any]) -> None:
    status = _stage_status(manifest, "evaluate")
    if status != "done":
        raise NotFinished(f"{root}: the run is not finished (evaluate: {status}); finish it "
                          f"with `copa run {manifest.get('recipe', 'RECIPE')}` (recipe "
                          f"{manifest.get('name', root.name)})")


def _open_run(root: Path, arm: str) -> Bundle:
    manifest = _run_manifest(root)
    _check_evaluated(root, manifest)
    try:
        recipe, template = _run_recipe(root, manifest)
    except RecipeError as exc:
        raise NotFinished(f"{root}: its recipe no longer loads: {exc}") from None
    report = _report(root / "report.json", RERUN_EVALUATE)
    arms = [a for a, data in report["arms"].items() if not data.get("failed")]
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
        model = root / (report["arms"][chosen].get("model_dir") or "merged")
        if not (model / "config.json").is_file():
            raise NotFinished(f"{root}: the merged model ({model}) is missing: re-run "
                              "`copa merge RECIPE`")
        _model_weights(model, "re-run `copa merge RECIPE --force`")
        model_path = str(model)
    else:
        from copa.models import resolve_model

        model_path = resolve_model(recipe.model.base, recipe.base_dir)
        if Path(model_path).is_dir():
            _model_weights(Path(model_path), "restore the run's base model (model.base)")
    program = root / "optimize" / f"program_{chosen}.json" if chosen in OPTIMIZED_ARMS else None
    if program is not None and not program.is_file():
        raise NotFinished(f"{root}: {program.name} is missing: re-run `copa optimize RECIPE`")
    if program is not None:  # a damaged program is said now, not once the model has loaded
        _read_json(program, "re-run `copa optimize RECIPE --force`")
    return Bundle(root=root, kind="run", arm=chosen, recipe=recipe, template_text=template,
                  model_path=model_path, model_role=role, program_path=program, val=val,
                  report=report)


def _open_export(root: Path, arm: str) -> Bundle:
    info = _read_json(root / EXPORT_MANIFEST, EXPORT_AGAIN)
    if info.get("format") != EXPORT_FORMAT:
        raise NotFinished(f"{root}: export format {info.get('format')} is not {EXPORT_FORMAT}, "
                          "the one this copa reads; export the run again with this copa")
    _keys(info, root / EXPORT_MANIFEST, EXPORT_AGAIN, arm=str, recipe=str, template=str,
          program=str, model=str, model_role=str)
    if not isinstance(info.get("val", {}), dict):
        raise _damaged(root / EXPORT_MANIFEST, "'val' is not an object", EXPORT_AGAIN)
    if arm not in ("best", info["arm"]):
        raise NotFinished(f"{root}: this export holds arm '{info['arm']}' only; export arm "
                          f"'{arm}' from the run directory (`copa export RUN_DIR OUT --arm {arm}`)")
    missing = [info[k] for k in ("recipe", "template", "program", "model")
               if not (root / info[k]).exists()]
    if missing:
        raise NotFinished(f"{root}: incomplete export, missing {', '.join(missing)}")
    _read_json(root / info["program"], EXPORT_AGAIN)  # damaged: said before the model loads
    _model_weights(root / info["model"], EXPORT_AGAIN)
    try:
        recipe = load_recipe(root / info["recipe"], written=True)
    except RecipeError as exc:
        raise NotFinished(f"{root}: its recipe does not load: {exc}") from None
    report = _report(root / "report.json", EXPORT_AGAIN) if (root / "report.json").is_file() \
        else None
    return Bundle(root=root, kind="export", arm=info["arm"], recipe=recipe,
                  template_text=(root / info["template"]).read_text(encoding="utf-8"),
                  model_path=str(root / info["model"]), model_role=info["model_role"],
                  program_path=root / info["program"], val=info.get("val", {}), report=report)
