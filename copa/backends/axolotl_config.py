"""The Axolotl config a recipe trains with, as data: rendered from templates/axolotl/, with
finetune.axolotl's pass-through keys checked and Axolotl's own validation run on it. What
render writes as axolotl.yml and what the training process (copa.backends.axolotl) reads.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from copa.backends.base import Hardware
from copa.files import atomic_write_text, quiet_fds
from copa.models import lora_targets
from copa.prompting import templates_dir
from copa.recipe import Problem, Recipe, RecipeError

CONFIG_TEMPLATE = "axolotl/config.yml.j2"
# An Axolotl plugin (copa/backends/axolotl_plugin.py) named in every rendered config: it seeds
# before the LoRA adapter exists (Axolotl seeds only when it builds the Trainer, after that) and
# reports progress from a TrainerCallback.
SEED_PLUGIN = "copa.backends.axolotl_plugin.CopaPlugin"
# Keys copa renders from the recipe's own sections: setting them under finetune.axolotl would
# make the recipe say two things at once.
OWNED_KEYS = {
    "base_model", "adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
    "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay",
    "max_grad_norm", "seed", "val_set_size", "datasets", "output_dir", "trust_remote_code",
}


def adapter_kind(recipe: Recipe, hardware: Hardware) -> str:
    """`auto` is QLoRA where there is CUDA and plain LoRA on CPU."""
    ft = recipe.finetune
    if ft.adapter == "auto":
        return "qlora" if hardware.cuda and ft.load_in_4bit is not False else "lora"
    return ft.adapter


def training_bf16(recipe: Recipe, hardware: Hardware) -> str:
    """Axolotl's `bf16:` for the recipe's finetune.precision: 'auto' leaves it to Axolotl on a
    GPU (bf16 where the GPU has it); on a CPU copa.precision decides."""
    from copa import precision

    choice = recipe.finetune.precision
    if hardware.cuda and choice == "auto":
        return "auto"
    return "true" if precision.resolve(choice, hardware.cuda) == "bf16" else "false"


def render_config(recipe: Recipe, base_model: str, train_path: Path, work_dir: Path,
                  hardware: Hardware) -> dict[str, Any]:
    """The Axolotl config for a recipe, as data (also what gets written as axolotl.yml)."""
    ft = recipe.finetune
    values = {
        "recipe_name": recipe.name,
        "base_model": base_model,
        "trust_remote_code": recipe.model.trust_remote_code,
        "adapter": adapter_kind(recipe, hardware),
        "lora_r": ft.lora_r,
        "lora_alpha": ft.lora_alpha,
        "lora_dropout": ft.lora_dropout,
        "lora_target_modules": lora_targets(base_model, ft.lora_target_modules),
        "train_path": str(train_path),
        "prepared_path": str(work_dir / "prepared"),
        "output_dir": str(work_dir / "checkpoints"),
        "val_set_size": ft.val_set_size,
        "sequence_len": ft.sequence_len,
        "micro_batch_size": ft.micro_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "max_steps": ft.max_steps,
        "num_epochs": None if ft.max_steps else ft.num_epochs,
        "learning_rate": ft.learning_rate,
        "lr_scheduler": ft.lr_scheduler,
        "warmup_steps": ft.warmup_steps,
        "weight_decay": ft.weight_decay,
        "max_grad_norm": ft.max_grad_norm,
        "seed": ft.seed,
        "save_steps": ft.save_steps,
        "cuda": hardware.cuda,
        "bf16": training_bf16(recipe, hardware),
        "flash_attention": hardware.flash_attention,
        "distributed_backend": ft.distributed.backend,
        "deepspeed_config": str(templates_dir() / "axolotl" / "deepspeed"
                                / f"zero{ft.distributed.zero_stage}.json"),
    }
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                        trim_blocks=True, lstrip_blocks=True)
    text = env.from_string((templates_dir() / CONFIG_TEMPLATE).read_text()).render(values)
    config = yaml.safe_load(text)
    config.update(ft.axolotl)
    # Seeds LoRA's init; a recipe's own plugins come first.
    config["plugins"] = [p for p in config.get("plugins") or [] if p != SEED_PLUGIN] + [SEED_PLUGIN]
    if ft.distributed.backend == "fsdp":
        config.setdefault("fsdp_config", {})["offload_params"] = False
    return config


def relocated_config(config: dict[str, Any], train_path: Path, work_dir: Path
                     ) -> dict[str, Any]:
    """The same training done elsewhere: rows read from train_path, prepared data and
    checkpoints under work_dir (render_config's places), every other value as it was."""
    moved = copy.deepcopy(config)
    moved["datasets"] = [{**d, "path": str(train_path)} for d in moved["datasets"]]
    moved["dataset_prepared_path"] = str(Path(work_dir) / "prepared")
    moved["output_dir"] = str(Path(work_dir) / "checkpoints")
    return moved


def _axolotl_keys() -> set[str]:
    with quiet_fds():
        from axolotl.utils.schemas.config import AxolotlInputConfig

    keys = set()
    for name, field in AxolotlInputConfig.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def check_passthrough(recipe: Recipe, label: str) -> list[Problem]:
    """finetune.axolotl keys Axolotl would silently drop, or that the recipe already sets."""
    problems = []
    if not recipe.finetune.axolotl:
        return problems
    known = _axolotl_keys()
    for key in recipe.finetune.axolotl:
        path = f"finetune.axolotl.{key}"
        if key in OWNED_KEYS:
            problems.append(Problem(file=label, path=path, message=(
                "set by copa from the recipe: write it in the finetune section instead")))
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem(file=label, path=path,
                                    message=f"not an Axolotl config key{hint}"))
    return problems


def validate_config(config: dict[str, Any], label: str) -> None:
    """Run Axolotl's own validation on a rendered config; raise RecipeError on failure."""
    from pydantic import ValidationError

    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    with quiet_fds():
        from axolotl.utils.config import validate_config as axolotl_validate
        from axolotl.utils.dict import DictDefault

    try:
        axolotl_validate(DictDefault(copy.deepcopy(config)))
    except ValidationError as exc:
        problems = [Problem(file=label, path="finetune (axolotl: "
                            + ".".join(str(p) for p in e["loc"]) + ")", message=e["msg"])
                    for e in exc.errors()]
        raise RecipeError(problems) from None
    except (ValueError, TypeError) as exc:
        raise RecipeError([Problem(file=label, path="finetune",
                                   message=f"Axolotl rejects the config: {exc}")]) from None


def checked_config(recipe: Recipe, base_model: str, train_path: Path, work_dir: Path,
                   hardware: Hardware | None = None, label: str | None = None,
                   validate: bool = True) -> dict[str, Any]:
    """The Axolotl config for training `base_model` on the rows at train_path, checked as
    every copa config is (finetune.axolotl keys, then Axolotl's own validation)."""
    config = render_config(recipe, base_model, train_path, work_dir,
                           hardware or Hardware.detect())
    if validate:
        label = label or (str(recipe.source_path) if recipe.source_path else "<recipe>")
        problems = check_passthrough(recipe, label)
        if problems:
            raise RecipeError(problems)
        validate_config(config, label)
    return config


def steps_for(recipe: Recipe, train_rows: int) -> int:
    """How many optimizer steps training will take (for progress ETA and checkpoints)."""
    ft = recipe.finetune
    if ft.max_steps:
        return ft.max_steps
    per_step = ft.micro_batch_size * ft.gradient_accumulation_steps
    per_epoch = max(1, -(-train_rows // per_step))
    return max(1, int(per_epoch * (ft.num_epochs or 1)))


def write_config(config: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, width=100))
