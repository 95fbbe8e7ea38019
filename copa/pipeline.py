"""Stages, the run directory and its manifest: recipe -> render -> train -> merge -> optimize ->
evaluate. Each stage reads the previous stages' files and writes its own; a stage whose content
key is unchanged is skipped, and a stage is marked done only once its artifacts are complete.

runs/<name>/
  manifest.json            per stage: key, status, times, artifacts
  rendered/                splits/, train.jsonl, val.jsonl, axolotl.yml, prompt_preview.txt
  train/                   checkpoints/ (Axolotl output_dir), axolotl-train.log
  merged/                  the standalone merged model
  optimize/                program_<arm>.json, optimize.json
  report.json, report.md, report.png, predictions/<arm>.jsonl
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from copa.checks import Checked, check_recipe
from copa.files import atomic_write_json, sha256_file, sha256_json
from copa.recipe import Problem, Recipe, RecipeError, load_recipe, recipe_section_dict

STAGES = ("render", "train", "merge", "optimize", "evaluate")
Emit = Callable[[str], None]


def versions() -> dict[str, str]:
    found = {}
    for name in ("copa", "axolotl", "dspy", "transformers", "torch", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        if path.is_file():
            return cls(path, json.loads(path.read_text()))
        return cls(path, {"stages": {}})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("stages", {}).setdefault(name, {})

    def is_done(self, name: str, key: str) -> bool:
        entry = self.data.get("stages", {}).get(name, {})
        return entry.get("status") == "done" and entry.get("key") == key

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


@dataclass
class Run:
    """A recipe bound to its run directory."""

    recipe: Recipe
    checked: Checked
    dir: Path
    manifest: Manifest
    emit: Emit = print
    keys: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rendered(self) -> Path:
        return self.dir / "rendered"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def optimize_dir(self) -> Path:
        return self.dir / "optimize"

    @property
    def finetunes(self) -> bool:
        return self.recipe.finetune.enabled


def run_dir_for(recipe: Recipe, override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if recipe.run_dir:
        return recipe.resolve(recipe.run_dir)
    return Path.cwd() / "runs" / recipe.name


def open_run(recipe_path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None,
             force: bool = False, emit: Emit = print,
             overrides: dict[str, Any] | None = None) -> Run:
    """Load and check the recipe and claim its run directory."""
    recipe = load_recipe(recipe_path, overrides=overrides)
    checked = check_recipe(recipe)
    directory = run_dir_for(recipe, run_dir).resolve()
    manifest = Manifest.load(directory / "manifest.json")
    owner = manifest.data.get("recipe")
    here = str(recipe.source_path)
    if owner and owner != here and not force:
        raise RecipeError([Problem(
            file=str(recipe_path), path="name",
            message=f"run directory {directory} belongs to recipe {owner}; "
                    "rename this recipe, set run_dir, or pass --force")])
    manifest.data["recipe"] = here
    manifest.data["name"] = recipe.name
    return Run(recipe=recipe, checked=checked, dir=directory, manifest=manifest, emit=emit)


# ---- content keys: what each stage reads ------------------------------------------------------

def _template_text(run: Run) -> str:
    return run.checked.spec.template.text


def stage_key(run: Run, stage: str) -> str:
    r = run.recipe
    v = versions()
    if stage == "render":
        sections = ["model", "task", "data", "prompt", "finetune"]
        if r.optimize.order == "p->w":  # the training rows carry the prompt stage's demos
            sections += ["optimize", "evaluate", "serve"]
        return sha256_json([recipe_section_dict(r, *sections), _template_text(run), v["copa"]])
    if stage == "train":
        return sha256_json([sha256_file(run.rendered / "axolotl.yml"),
                            sha256_file(run.rendered / "train.jsonl"),
                            v["axolotl"], v["transformers"], v["torch"], v["peft"]])
    if stage == "merge":
        return sha256_json([run.keys["train"], v["axolotl"]])
    if stage == "optimize":
        return sha256_json([run.keys.get("merge"), recipe_section_dict(r, "model", "task",
                                                                       "optimize", "serve"),
                            r.evaluate.metric, r.evaluate.max_tokens, _template_text(run),
                            sha256_file(run.rendered / "splits" / "train.jsonl"),
                            sha256_file(run.rendered / "splits" / "val.jsonl"),
                            sha256_file(run.rendered / "demos.json"), v["dspy"], v["copa"]])
    if stage == "evaluate":
        return sha256_json([run.keys["optimize"], recipe_section_dict(r, "evaluate"),
                            sha256_file(run.rendered / "splits" / "test.jsonl")])
    raise ValueError(stage)


# ---- stages -----------------------------------------------------------------------------------

def do_render(run: Run) -> dict[str, Any]:
    from copa.render import render

    demos = None
    if run.recipe.optimize.order == "p->w" and run.finetunes:
        from copa.optimizer import prompt_first

        run.emit("  p -> w: optimizing prompts on the base model first")
        demos = prompt_first(run)
        run.emit(f"  fine-tuning rows will carry the {len(demos)} demos it chose")
    result = render(run.checked, run.rendered, work_dir=run.train_dir, demos=demos,
                    emit=run.emit)
    return {"config": str(result.config_path), "train_rows": result.train_rows}


def do_train(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend
    from copa.data import read_jsonl
    from copa.render import steps_for

    rows = len(read_jsonl(run.rendered / "train.jsonl"))
    adapter = get_backend().train(run.recipe, run.rendered / "axolotl.yml", run.train_dir,
                                  emit=run.emit, total_steps=steps_for(run.recipe, rows))
    return {"adapter": str(adapter), "log": str(run.train_dir / "axolotl-train.log")}


def do_merge(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend

    adapter = Path(run.manifest.stage("train")["artifacts"]["adapter"])
    get_backend().merge(run.rendered / "axolotl.yml", adapter, run.merged, run.train_dir)
    return {"model": str(run.merged)}


def do_optimize(run: Run) -> dict[str, Any]:
    from copa.optimizer import optimize_stage

    return optimize_stage(run)


def do_evaluate(run: Run) -> dict[str, Any]:
    from copa.evaluate import evaluate_stage

    return evaluate_stage(run)


STAGE_FUNCS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "render": do_render, "train": do_train, "merge": do_merge,
    "optimize": do_optimize, "evaluate": do_evaluate,
}


def _invalidate(run: Run, stage: str, forced: bool = False) -> None:
    """A stage about to re-run with new inputs (or by --force): clear what its old run left
    behind, so Axolotl does not resume from checkpoints of other inputs."""
    if stage == "train":
        entry = run.manifest.stage("train")
        if forced or (entry.get("key") and entry.get("key") != run.keys.get("train")):
            shutil.rmtree(run.train_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(run.train_dir / "prepared", ignore_errors=True)


def _paths(artifacts: Any) -> list[Path]:
    if isinstance(artifacts, dict):
        return [p for value in artifacts.values() for p in _paths(value)]
    return [Path(artifacts)] if isinstance(artifacts, str) else []


def is_current(run: Run, stage: str, key: str) -> bool:
    """Done with this very key, and every artifact it recorded is still on disk."""
    if not run.manifest.is_done(stage, key):
        return False
    return all(path.exists() for path in _paths(run.manifest.stage(stage).get("artifacts")))


def run_stages(run: Run, stages: Sequence[str] = STAGES, force: Sequence[str] = ()) -> Run:
    """Run the named stages and every stage before them, in order; a stage whose key is
    unchanged and whose artifacts are on disk is skipped (keys chain, so a changed stage makes
    everything after it re-run)."""
    last = max((STAGES.index(s) for s in stages), default=-1)
    for stage in STAGES[:last + 1]:
        if not run.finetunes and stage in ("train", "merge"):
            continue
        key = stage_key(run, stage)
        run.keys[stage] = key
        if stage not in force and is_current(run, stage, key):
            run.emit(f"[{stage}] unchanged, skipped")
            continue
        _invalidate(run, stage, forced=stage in force)
        run.emit(f"[{stage}] running")
        entry = run.manifest.stage(stage)
        entry.update({"key": key, "status": "running", "started": _now()})
        entry.pop("ended", None)
        run.manifest.save()
        start = time.time()
        try:
            artifacts = STAGE_FUNCS[stage](run)
        except BaseException:
            entry["status"] = "failed"
            entry["ended"] = _now()
            run.manifest.save()
            raise
        run.timings[stage] = time.time() - start
        entry.update({"status": "done", "ended": _now(), "seconds": round(run.timings[stage], 2),
                      "artifacts": artifacts})
        run.manifest.save()
        run.emit(f"[{stage}] done in {run.timings[stage]:.1f}s")
    return run


def run(recipe_path: str | os.PathLike[str], *, stages: Sequence[str] = STAGES,
        force: Sequence[str] = (), run_dir: str | os.PathLike[str] | None = None,
        emit: Emit = print, overrides: dict[str, Any] | None = None) -> Run:
    """What `copa run` does: every stage in order (or the named ones and what they need)."""
    opened = open_run(recipe_path, run_dir=run_dir, force=bool(force), emit=emit,
                      overrides=overrides)
    opened.dir.mkdir(parents=True, exist_ok=True)
    return run_stages(opened, stages, force)
