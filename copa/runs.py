"""The run directory, its manifest and each stage's content key.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from copa.data import data_identity
from copa.files import atomic_write_json, sha256_file, sha256_json
from copa.recipe import Problem, Recipe, RecipeError, load_recipe, recipe_section_dict
from copa.recipe.checks import Checked, check_recipe

Emit = Callable[[str], None]


def versions() -> dict[str, str]:
    found = {}
    for name in ("copa", "axolotl", "dspy", "transformers", "torch", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def now() -> str:
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
        # The data's content, not just its name: a file edited in place re-renders the splits.
        return sha256_json([recipe_section_dict(r, *sections), _template_text(run), v["copa"],
                            data_identity(r)])
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
