"""copa export: one arm of a finished run as a self-contained folder a colleague can use without
the run directory:

  OUT_DIR/
    copa-export.json   what is where, the arm, its val scores (what copa.load reads)
    model/             the arm's model: safetensors, tokenizer, chat template
    program.json       the program, saved with DSPy's own save (instructions, demos)
    template.jinja     the prompt template the model was trained and evaluated with
    recipe.yaml        the recipe (prompt.template points at template.jinja)
    report.json        the run's report: four arms on test, with intervals
    README.md          model card: task, data, results, training, licenses, how to serve

The folder is written beside OUT_DIR and renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from copa.files import atomic_dir, atomic_write_json, atomic_write_text
from copa.recipe import Recipe, recipe_to_write
from copa.use.bundle import EXPORT_FORMAT, EXPORT_MANIFEST, Bundle, open_bundle
from copa.use.card import model_card


class ExportError(Exception):
    pass


class ExportRefused(Exception):
    """An export refused before anything is written (the CLI exits 2 with the message): the
    destination exists, or what was asked for cannot be exported."""


def shareable_recipe(recipe: Recipe, template_name: str) -> dict[str, Any]:
    """The recipe as data for the exported folder: its template beside it, data paths absolute
    (they only say where the data came from), no run_dir, and no server keys."""
    data = recipe_to_write(recipe)
    data["prompt"]["template"] = template_name
    data.pop("run_dir", None)
    for key in ("source", "test_source"):
        value = data["data"].get(key)
        if value and ":" not in value and not Path(value).is_absolute():
            data["data"][key] = str(recipe.resolve(value))
    return data


def model_folder(model_path: str) -> Path:
    """The arm's model as a local folder (a hub id: its snapshot in the local hub cache)."""
    source = Path(model_path)
    if not source.is_dir():
        from copa.inference.cache import hub_snapshot

        snapshot = hub_snapshot(model_path)
        if snapshot is None:
            raise ExportError(f"model {model_path}: not a folder, and not in the local hub cache")
        source = snapshot
    return source


def _copy_model(model_path: str, target: Path) -> None:
    source = model_folder(model_path)
    if not any(source.glob("*.safetensors")):
        raise ExportError(f"model {source}: no .safetensors weights to export")
    config = source / "tokenizer_config.json"
    if not (source / "chat_template.jinja").is_file() and not (
            config.is_file() and '"chat_template"' in config.read_text()):
        raise ExportError(f"model {source}: no chat template (chat_template.jinja or "
                          "tokenizer_config.json's chat_template): it could not be prompted")
    # Hub snapshots are symlinks into the blob store: copy the files they point at.
    shutil.copytree(source, target, symlinks=False,
                    ignore=shutil.ignore_patterns(".*", "*.gguf", "*.bin", "*.pt", "*.pth"))


def _copy_user_module(recipe: Recipe, out: Path) -> str | None:
    """A task.module written as 'package.module:Class' beside the recipe goes into the folder
    (its top-level package or module file); the exported recipe finds it there."""
    module = recipe.task.module
    if module in ("predict", "chain_of_thought"):
        return None
    top = module.split(":")[0].split(".")[0]
    for candidate in (recipe.base_dir / top, recipe.base_dir / f"{top}.py"):
        if candidate.is_dir():
            shutil.copytree(candidate, out / top, ignore=shutil.ignore_patterns("__pycache__"))
            return top
        if candidate.is_file():
            shutil.copy2(candidate, out / candidate.name)
            return candidate.name
    raise ExportError(f"task.module {module}: '{top}' is not beside the recipe "
                      f"({recipe.base_dir}); an export carries only code found there")


def write_program(bundle: Bundle, target: Path) -> None:
    if bundle.program_path is not None:
        shutil.copy2(bundle.program_path, target)
        return
    from copa.dspy.program import make_program

    make_program(bundle.recipe).save(str(target))  # the plain program, in DSPy's own format


def check_destination(out_dir: str | Path, bundle: Bundle) -> Path:
    """out_dir, resolved, if an export may be written there: a new or empty folder outside
    the run; else ExportRefused (nothing has been written)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out_dir} is a file: give a new folder to export into")
    if out.exists() and any(out.iterdir()):
        raise ExportRefused(f"{out_dir} exists and is not empty: choose a new folder")
    if out == bundle.root or bundle.root in out.parents:
        raise ExportRefused(f"{out_dir} is inside {bundle.root}: export to a folder outside it")
    model = Path(bundle.model_path).expanduser()
    model = model.resolve() if model.is_dir() else None  # a hub id: its cache is not the user's
    if model is not None and (out == model or model in out.parents):
        # the export would become part of the model it copies: every later export (and the
        # hash that keys the run's response cache) would carry it
        raise ExportRefused(f"{out_dir} is inside the {bundle.arm} arm's model folder {model}: "
                            "export to a folder outside it")
    return out


def export(path: str | Path, out_dir: str | Path, arm: str = "best",
           emit: Callable[[str], None] = print) -> Path:
    """Write arm `arm` of a finished run (or of an export) into out_dir; returns out_dir."""
    bundle = open_bundle(path, arm)
    out = check_destination(out_dir, bundle)
    emit(f"exporting the {bundle.arm} arm of {bundle.root} to {out}")
    with atomic_dir(out) as tmp:
        _copy_model(bundle.model_path, tmp / "model")
        write_program(bundle, tmp / "program.json")
        atomic_write_text(tmp / "template.jinja", bundle.template_text)
        recipe_data = shareable_recipe(bundle.recipe, "template.jinja")
        atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(recipe_data, sort_keys=False,
                                                              allow_unicode=True))
        module = _copy_user_module(bundle.recipe, tmp)
        if bundle.report:
            atomic_write_json(tmp / "report.json", bundle.report, sort_keys=False)
        info = {"format": EXPORT_FORMAT, "name": bundle.recipe.name, "arm": bundle.arm,
                "model_role": bundle.model_role, "model": "model", "program": "program.json",
                "template": "template.jinja", "recipe": "recipe.yaml",
                "user_module": module, "val": bundle.val,
                "signature": bundle.recipe.task.signature}
        atomic_write_json(tmp / EXPORT_MANIFEST, info)
        atomic_write_text(tmp / "README.md", model_card(bundle, out.name))
    return out
