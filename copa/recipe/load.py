"""The recipe: one YAML file, read safely, interpolated and validated into
`copa.recipe.schema.Recipe`.

Loading never imports torch, transformers, dspy or axolotl, so `copa validate` answers fast.
Every problem found is collected and reported at once as `file: key.path: message`.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from copa.files import missing_file_reason
from copa.recipe.schema import (
    Problem,
    Recipe,
    RecipeError,
)
from copa.recipe.values import ADDED_LATER
from copa.recipe.yamlread import MAX_DEPTH, MAX_YAML_BYTES, YAMLProblem, read_yaml

MAX_RECIPE_BYTES = MAX_YAML_BYTES

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def interpolate(value: Any, env: dict[str, str], where: str = "") -> Any:
    """Expand ${VAR} and ${VAR:-default} inside every string of a YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def expand(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise _InterpolationError(where, f"environment variable {name} is not set "
                                  f"(set it, or write ${{{name}:-default}})")

    return _ENV.sub(expand, value)


class _InterpolationError(Exception):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(str(item))
    return "".join(parts)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of loc (for 'did you mean')."""
    model: Any = Recipe
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        annotation = field.annotation
        # An optional section (`retrieve: RetrieveSection | None`) is its model too.
        options = [annotation, *typing.get_args(annotation)]
        found = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


# What people write for a key, from other trainers' configs (HF Trainer, Axolotl, PEFT), where
# spelling distance finds nothing: {their name: copa's names, whichever the section has}.
_OTHER_NAMES: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate",), "learningrate": ("learning_rate",),
    "epochs": ("num_epochs",), "num_train_epochs": ("num_epochs",), "n_epochs": ("num_epochs",),
    "batch_size": ("micro_batch_size",), "bs": ("micro_batch_size",),
    "per_device_train_batch_size": ("micro_batch_size",),
    "max_seq_length": ("sequence_len",), "max_seq_len": ("sequence_len",),
    "seq_len": ("sequence_len",), "max_length": ("sequence_len",),
    "r": ("lora_r",), "rank": ("lora_r",), "alpha": ("lora_alpha",),
    "dropout": ("lora_dropout",), "target_modules": ("lora_target_modules",),
    "grad_accum": ("gradient_accumulation_steps",), "steps": ("max_steps",),
    "warmup": ("warmup_steps",),
    "model": ("base",), "name": ("base",), "model_name": ("base",),
    "model_name_or_path": ("base",), "path": ("base", "source"), "file": ("source",),
    "dataset": ("source",),
}


# Keys copa once had and never read, since removed: {(section, key): (the value a stage key
# holds for it, what decides instead)}. Spelling distance would send such a key to a neighbour
# ('split_from' -> 'splits'); copa's own files from before (recipe.json, an export's
# recipe.yaml) still hold it, and are read with it dropped (drop_removed_keys).
_REMOVED: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "split_from"): (
        "source", "data.test_source decides: with it, test rows come from that file and train "
        "/ val from data.source; without it, all three come from data.source"),
}


def drop_removed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe copa wrote (recipe.json, an export's recipe.yaml) without the keys it has
    since removed, which it wrote down while they existed."""
    for section, key in _REMOVED:
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    return raw


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        gone = _REMOVED.get((str(loc[-2]) if len(loc) > 1 else "", key))
        if gone:
            return f"no longer a key (copa never read it): {gone[1]}"
        model = _section_model(loc)
        known = [k for k in model.model_fields if k != "source_path"] if model else []
        close = [k for k in _OTHER_NAMES.get(key.lower(), ()) if k in known] or \
            difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            return f"unknown key (did you mean '{close[0]}'?)"
        return f"unknown key (known keys: {', '.join(known)})" if known else "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if kind == "literal_error":
        return f"{message} (got {error.get('input')!r})"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message} (got {error.get('input')!r})" + _unquoted_hint(kind, error.get("input"))
    return message


def _unquoted_hint(kind: str, value: Any) -> str:
    """Text that YAML read as something else: an unquoted yes/no/on/off is a boolean to it,
    an unquoted 1.10 a number (so a label 'yes' arrives as True), an empty value null."""
    if kind != "string_type":
        return ""
    if value is None:
        return ("; in YAML a key with nothing after it (or null, ~) is null: write the text, "
                "in quotes if it is empty ('')")
    if isinstance(value, bool):
        return ("; in YAML an unquoted yes/no/on/off/true/false is a boolean: write text in "
                "quotes ('yes')")
    if isinstance(value, int | float):
        return "; in YAML an unquoted 1.10 is a number: write text in quotes ('1.10')"
    return ""


def load_recipe(path: str | os.PathLike[str], env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None, written: bool = False) -> Recipe:
    """Read, interpolate and validate a recipe file; raise RecipeError listing every problem.
    `written`: a recipe copa wrote (an export's recipe.yaml), read without keys since removed."""
    file = Path(path)
    label = str(path)
    reason = missing_file_reason(file)
    if reason:
        message = "no such recipe file" if reason == "no such file" else f"{reason}, not a recipe"
        raise RecipeError([Problem(file=label, path="", message=message)])
    if file.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError([Problem(file=label, path="", message="recipe file is over 1 MB")])
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError([Problem(file=label, path="", message="not UTF-8 text")]) from None
    try:
        raw = read_yaml(text)  # bounded: aliases, depth, integers; duplicate keys refused
    except YAMLProblem as exc:
        raise RecipeError([Problem(file=label, path=exc.path, message=exc.message)]) from None
    if not isinstance(raw, dict):
        raise RecipeError([Problem(
            file=label, path="",
            message="a recipe is a YAML mapping of sections (name, task, data, ...)")])
    for key in raw:
        if not isinstance(key, str):
            raise RecipeError([Problem(file=label, path=str(key), message="keys must be strings")])
    try:
        raw = interpolate(raw, dict(os.environ) if env is None else env)
    except _InterpolationError as exc:
        raise RecipeError([Problem(file=label, path=exc.path, message=exc.message)]) from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, label)
    if written:
        drop_removed_keys(raw)
    return recipe_from_dict(raw, label, source_path=file.resolve())


def recipe_from_dict(raw: dict[str, Any], label: str = "<recipe>",
                     source_path: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [Problem(file=label, path=_loc(e["loc"]), message=_describe(e))
                    for e in exc.errors()]
        raise RecipeError(problems) from None
    recipe.source_path = source_path
    return recipe


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, label: str) -> None:
    """One --set override; a path through a value that is not a section is a recipe problem."""
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise RecipeError([Problem(file=label, path=dotted or "--set",
                                   message="not a key path: write --set section.key=VALUE")])
    if len(keys) > MAX_DEPTH:  # the recipe file itself may nest no deeper
        raise RecipeError([Problem(file=label, path=dotted[:80] + "...", message=(
            f"a key path of {len(keys)} levels; a recipe nests at most {MAX_DEPTH}"))])
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            parent = ".".join(keys[:depth + 1])
            raise RecipeError([Problem(
                file=label, path=dotted,
                message=f"'{parent}' is a value ({type(node).__name__}), not a section with "
                        f"keys; write --set {parent}=VALUE")])
    node[keys[-1]] = copy.deepcopy(value)  # a later override into it must not change the caller's


def recipe_section_dict(recipe: Recipe, *sections: str) -> dict[str, Any]:
    """The named sections as plain data (for content keys and manifests)."""
    data = recipe.model_dump(mode="json")
    return {name: data.get(name) for name in sections}


def added_later(field: FieldInfo) -> bool:
    """Whether a schema field is marked ADDED_LATER (copa.recipe.values)."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(next(iter(ADDED_LATER))))


def recipe_key_dict(recipe: Recipe, *sections: str) -> dict[str, Any]:
    """recipe_section_dict for a stage's content key: a key marked ADDED_LATER in the schema is
    left out while at its default, so runs made before it existed keep their keys."""
    content = recipe_section_dict(recipe, *sections)
    for name in sections:
        _drop_later_defaults(getattr(recipe, name, None), content.get(name))
    for (section, key), (value, _) in _REMOVED.items():
        if isinstance(content.get(section), dict):  # every key made while it existed holds it
            content[section][key] = value
    return content


def _drop_later_defaults(model: Any, data: Any) -> None:
    if not isinstance(model, BaseModel) or not isinstance(data, dict):
        return
    for name, field in type(model).model_fields.items():
        if name not in data:
            continue
        if added_later(field):
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if data[name] == default:
                del data[name]
                continue
        _drop_later_defaults(getattr(model, name), data[name])


# A key to a server of the user's own is never written to disk (recipe.json, an export's
# recipe.yaml): this placeholder stands in, filled from the environment when read back.
SERVER_KEY_ENV = "COPA_SERVER_API_KEY"
SERVER_KEY_PLACEHOLDER = f"${{{SERVER_KEY_ENV}:-copa}}"


def _key_holders(data: dict[str, Any]) -> list[dict[str, Any]]:
    optimize = data.get("optimize") or {}
    roles = [optimize.get(r) for r in ("proposer", "teacher")]
    return [data.get("serve") or {}, *(r for r in roles if isinstance(r, dict))]


def recipe_to_write(recipe: Recipe) -> dict[str, Any]:
    """The recipe as data to write down, server keys replaced by SERVER_KEY_PLACEHOLDER."""
    data = recipe.model_dump(mode="json")
    for holder in _key_holders(data):
        if holder.get("api_key") not in (None, "copa"):
            holder["api_key"] = SERVER_KEY_PLACEHOLDER
    return data


def recipe_read_back(data: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """recipe_to_write's data with the server keys from the environment (COPA_SERVER_API_KEY)."""
    env = dict(os.environ) if env is None else env
    drop_removed_keys(data)
    for holder in _key_holders(data):
        if holder.get("api_key") == SERVER_KEY_PLACEHOLDER:
            holder["api_key"] = env.get(SERVER_KEY_ENV) or "copa"
    return data
