"""A study's cells as folders: each grid point's folder name, made of folder-safe characters
from its keys and values (short, distinct, never leaving the study folder)."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copa.recipe import Problem, RecipeError


def folder_part(value: Any) -> str:
    """A grid value as part of a folder name: 'p -> w' -> 'p-w', 0.001 -> '0.001'."""
    text = str(value).lower() if value is None or isinstance(value, bool) else str(value)
    text = re.sub(r"[^A-Za-z0-9_.+]+", "-", text).strip("-.") or "empty"
    if len(text) > 40:  # a long instruction: its start and a hash of the whole
        text = text[:32].rstrip("-.") + "-" + hashlib.sha256(str(value).encode()).hexdigest()[:6]
    return text


def _labels(keys: list[str], label: str) -> dict[str, str]:
    """Each grid key's label in folder names: its last part, unless two keys share it; made of
    folder-safe characters only, like the values (a key's last part under a free-form mapping,
    e.g. finetune.axolotl./abs/path or optimize.params.../x, is the user's text)."""
    last = [folder_part(k.split(".")[-1]) for k in keys]
    labels = {k: (tail if last.count(tail) == 1 else folder_part(k)) for k, tail in zip(keys, last)}
    taken: dict[str, str] = {}
    for key, name in labels.items():
        if name in taken:
            raise RecipeError([Problem(file=label, path=f"grid.{key}", message=(
                f"names the same cell folders as grid.{taken[name]} ('{name}=...'); make the "
                "keys differ in letters or digits"))])
        taken[name] = key
    return labels


MAX_CELL_NAME = 120  # a folder name's bytes are limited (255 on most file systems)


def _cell_name(parts: list[str]) -> str:
    name = ",".join(parts)
    if len(name) > MAX_CELL_NAME:  # many keys: the start and a hash of the whole
        name = name[:MAX_CELL_NAME - 8].rstrip("-.,=") + "-" + \
            hashlib.sha256(name.encode()).hexdigest()[:6]
    return name


def cell_names(grid: Mapping[str, list[Any]], label: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, grid values) of every grid point, in the grid's order. A name is made of
    letters, digits and _ . + - = , only: it never leaves the study folder."""
    keys = list(grid)
    if not keys:
        return [("base", {})]
    labels = _labels(keys, label)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        points.append((_cell_name([f"{labels[k]}={folder_part(v)}" for k, v in values.items()]),
                       values))
    names = [n for n, _ in points]
    for key in keys:
        parts = [folder_part(v) for v in grid[key]]
        if len(set(parts)) != len(parts):
            raise RecipeError([Problem(file=label, path=f"grid.{key}", message=(
                f"values {grid[key]} give the same folder name twice ({parts}); "
                "make them differ in letters or digits"))])
    if len(set(names)) != len(names):
        raise RecipeError([Problem(file=label, path="grid", message=(
            "two grid points give the same cell folder name; make the values differ in "
            "letters or digits"))])
    return points


def inside(directory: Path, rel_dir: str) -> bool:
    """rel_dir, under directory, stays inside it (no absolute part, no '..' out of it)."""
    root = directory.resolve()
    target = (root / rel_dir).resolve()
    return not Path(rel_dir).is_absolute() and target != root and target.is_relative_to(root)
