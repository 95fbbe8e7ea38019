"""The study file: a base recipe, a grid of recipe overrides, seeds, arms and per-cell resources,
read strictly (unknown keys are errors) and expanded into its cells.

    name: data_size                      # default: the file's name; runs go to runs/<name>/
    recipe: ../recipes/banking77.yaml    # relative to this file
    grid:                                # key.path: [values]; several keys = their product
      data.splits.train: [100, 200, 400]
    set: {evaluate.bootstrap: 1000}      # the same override in every cell
    seeds: [0, 1, 2]                     # data.splits.seed, finetune.seed (and the optimizer's)
    arms: [baseline, prompt_only, finetune_only, combined]
    resources: {num_cpus: 2}             # per cell, for --executor ray

Overrides are applied as `copa run --set key=value` applies them (copa.recipe.load_recipe's
overrides), and every cell's recipe is validated before anything runs. Nothing here imports
torch, DSPy or Ray.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from copa.files import missing_file_reason, output_problem, sha256_json
from copa.recipe import ARMS, Problem, RecipeError, load_recipe
from copa.recipe.data_schema import Section
from copa.recipe.load import _describe, _loc
from copa.recipe.schema import MAX_SEED, NAME, named_arms
from copa.recipe.yamlread import MAX_YAML_BYTES, YAMLProblem, read_yaml
from copa.study.cells import cell_names, inside

# The recipe keys one seed sets: the data split, the fine-tune (and through it the optimizer's
# seed, copa.dspy.search); a recipe that names optimize.params.seed gets it set too.
SEED_KEYS = ("data.splits.seed", "finetune.seed")
# Runs (grid points x seeds) a study may have: each is a training, so more is a typo (a
# grid of 5 keys x 10 values is 100000 runs, and checking each recipe took minutes).
MAX_RUNS = 1000
OPTIMIZER_SEED = "optimize.params.seed"


class Resources(Section):
    """What one cell asks of Ray (its task options)."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes")
    custom: dict[str, float] = Field(default_factory=dict,
                                     description="Ray custom resources, e.g. {accelerator: 1}")

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {k: v for k, v in (("num_cpus", self.num_cpus),
                                                     ("num_gpus", self.num_gpus),
                                                     ("memory", self.memory)) if v is not None}
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


class StudyFile(Section):
    name: str | None = None
    recipe: str
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    arms: list[Literal[ARMS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(ARMS))
    resources: Resources = Field(default_factory=Resources)
    bootstrap: int = Field(2000, ge=100, le=1_000_000,
                           description="Bootstrap resamples of the intervals.")
    run_dir: str | None = Field(None, description="Where the cells go; default runs/<name>.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME.match(value):
            raise ValueError("use letters, digits, '-', '_' or '.' (it names the study folder)")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"{key}: give at least one value, e.g. {key}: [1, 2]")
            seen: dict[Any, Any] = {}
            for v in values:  # 8 and 8.0 are one value: two cells would repeat one run
                if _same_as(v) in seen:
                    raise ValueError(f"{key}: values {seen[_same_as(v)]!r} and {v!r} are the "
                                     "same value (two cells would repeat one run); keep one")
                seen[_same_as(v)] = v
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_values(cls, value: Any) -> Any:
        # pydantic would read true as 1 and '3' as 3: a seed the file does not say
        for v in value if isinstance(value, list) else ():
            if isinstance(v, (bool, str)):
                shown = str(v).lower() if isinstance(v, bool) else repr(v)
                raise ValueError(f"seeds are whole numbers from 0 to {MAX_SEED} (got {shown})")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one seed, e.g. seeds: [0, 1, 2]")
        bad = [v for v in value if not 0 <= v <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds are whole numbers from 0 to {MAX_SEED} (got {bad[0]})")
        if len(set(value)) != len(value):
            raise ValueError("seeds repeat")
        return value

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: list[str]) -> list[str]:
        return [a for a in ARMS if a in named_arms(value)]  # table order


def _key_problems(spec: StudyFile, label: str) -> list[Problem]:
    """Grid and set keys are recipe key paths that `copa run --set KEY=VALUE` can say again
    (--print-commands): dotted non-blank parts, no '='. Said here, not as the base recipe's
    '--set' problem: the user wrote them in the study file."""
    problems = []
    for section in ("grid", "set"):
        for key in getattr(spec, section):
            if not key.strip():
                problems.append(Problem(file=label, path=section, message=(
                    f"key {key!r} is not a key path: write section.key, e.g. finetune.lora_r")))
            elif not all(part.strip() for part in key.split(".")):
                problems.append(Problem(file=label, path=f"{section}.{key}", message=(
                    "not a key path: write section.key, e.g. finetune.lora_r")))
            elif "=" in key:
                problems.append(Problem(file=label, path=f"{section}.{key}", message=(
                    "a key with '=': `copa run --set KEY=VALUE` (the printed commands) would "
                    "split it there; set it in the base recipe instead")))
    return problems


def _same_as(value: Any) -> Any:
    """A grid value in a form equal for equal YAML values: numbers by value (8 and 8.0), yes/no
    and text apart from numbers, lists and mappings by their parts."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, list):
        return ("list", tuple(_same_as(v) for v in value))
    if isinstance(value, dict):
        return ("map", tuple(sorted((str(k), _same_as(v)) for k, v in value.items())))
    return ("other", repr(value))


@dataclass(frozen=True)
class Cell:
    """One grid point on one seed: an ordinary run directory <cell>/seed-<seed>."""

    name: str                   # the grid point's folder, e.g. "train=100"
    values: dict[str, Any]      # grid key -> value at this point
    seed: int
    overrides: dict[str, Any]   # everything set on the base recipe (grid, set, seeds, arms)

    @property
    def rel_dir(self) -> str:
        return f"{self.name}/seed-{self.seed}"


@dataclass
class Study:
    file: Path
    spec: StudyFile
    name: str
    recipe: Path
    dir: Path
    cells: list[Cell] = field(default_factory=list)


def _read_yaml(path: Path) -> dict[str, Any]:
    label = str(path)
    reason = missing_file_reason(path)
    if reason:
        raise RecipeError([Problem(file=label, path="", message=(
            "no such study file" if reason == "no such file" else f"{reason}, not a study"))])
    if path.stat().st_size > MAX_YAML_BYTES:
        raise RecipeError([Problem(file=label, path="", message="study file is over 1 MB")])
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError([Problem(file=label, path="", message="not UTF-8 text")]) from None
    except YAMLProblem as exc:
        raise RecipeError([Problem(file=label, path=exc.path, message=exc.message)]) from None
    if not isinstance(raw, dict):
        raise RecipeError([Problem(file=label, path="", message=(
            "a study is a YAML mapping: recipe, grid, seeds, arms (see docs/studies.md)"))])
    return raw


def _study_problem(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        known = ", ".join(k for k in StudyFile.model_fields)
        return f"unknown key (a study has: {known})"
    return _describe(error)


def read_study_file(path: str | os.PathLike[str], seeds: list[int] | None = None) -> StudyFile:
    """The study file, checked; `seeds` (copa study --seeds) replaces the file's seeds."""
    file = Path(path)
    raw = _read_yaml(file)
    if seeds is not None:
        raw["seeds"] = list(seeds)
    try:
        spec = StudyFile.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([Problem(file=str(path), path=_loc(e["loc"]), message=_study_problem(e))
                           for e in exc.errors()]) from None
    problems = _key_problems(spec, str(path))
    if problems:
        raise RecipeError(problems)
    return spec


def _seed_keys(recipe_path: Path) -> tuple[str, ...]:
    base = load_recipe(recipe_path)
    return SEED_KEYS + ((OPTIMIZER_SEED,) if "seed" in base.optimize.params else ())


def _check_clashes(spec: StudyFile, seed_keys: tuple[str, ...], label: str) -> None:
    owned = {**{k: "seeds" for k in seed_keys}, "evaluate.arms": "arms"}
    problems = []
    for section in ("grid", "set"):
        for key in getattr(spec, section):
            if key in owned:
                problems.append(Problem(file=label, path=f"{section}.{key}", message=(
                    f"the study's '{owned[key]}:' sets {key}; list the values under "
                    f"'{owned[key]}:' instead")))
    for key in set(spec.grid) & set(spec.set):
        problems.append(Problem(file=label, path=f"set.{key}",
                                message="also in grid: keep it in one of the two"))
    if problems:
        raise RecipeError(problems)


def _recipe_problems(exc: RecipeError, cell: Cell, spec: StudyFile, label: str
                     ) -> list[Problem]:
    """A cell's recipe problems, named by the study key that caused them where one did."""
    out = []
    for problem in exc.problems:
        owner = None
        for section in ("grid", "set"):
            for key in getattr(spec, section):
                if problem.path == key or problem.path.startswith(key + ".") or \
                        problem.path.startswith(key + "[") or key.startswith(problem.path + "."):
                    owner = (section, key)
        if owner is None:
            out.append(problem)
            continue
        section, key = owner
        value = cell.values.get(key, spec.set.get(key))
        out.append(Problem(file=label, path=f"{section}.{key}",
                           message=f"{value!r}: {problem.message}"))
    return out


def load_study(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
               seeds: list[int] | None = None) -> Study:
    """Read and check a study file (with other seeds than it lists, if given); every cell's
    recipe is validated (RecipeError lists every problem, named by the study file and key)."""
    file = Path(path)
    label = str(path)
    spec = read_study_file(file, seeds)
    recipe = Path(os.path.expanduser(spec.recipe))
    recipe = (recipe if recipe.is_absolute() else file.resolve().parent / recipe).resolve()
    if missing_file_reason(recipe):
        raise RecipeError([Problem(file=label, path="recipe", message=(
            f"{recipe}: {missing_file_reason(recipe)}; write the base recipe's path, relative "
            "to the study file"))])
    if recipe == file.resolve():
        raise RecipeError([Problem(file=label, path="recipe", message=(
            "names this study file itself; write the base recipe's path, relative to the "
            "study file"))])
    cells = math.prod(len(values) for values in spec.grid.values())
    if cells * len(spec.seeds) > MAX_RUNS:  # counted before any cell is built or checked
        raise RecipeError([Problem(file=label, path="grid", message=(
            f"{cells} grid points x {len(spec.seeds)} seed(s) = {cells * len(spec.seeds)} runs; "
            f"a study runs at most {MAX_RUNS}: give fewer values, or split it into studies"))])
    seed_keys = _seed_keys(recipe)
    _check_clashes(spec, seed_keys, label)
    name = spec.name or file.stem
    if not NAME.match(name):
        raise RecipeError([Problem(file=label, path="name", message=(
            f"the file name {file.stem!r} cannot name a folder; write name: my_study"))])
    if out_dir is not None:
        directory = Path(out_dir)
    elif spec.run_dir:
        directory = Path(os.path.expanduser(spec.run_dir))
        directory = directory if directory.is_absolute() else file.resolve().parent / directory
        problem = output_problem(directory, folder=True)  # as --out is checked: before any cell
        if problem:
            raise RecipeError([Problem(file=label, path="run_dir",
                                       message=f"{spec.run_dir}: {problem}")])
    else:
        directory = Path.cwd() / "runs" / name
    study = Study(file=file.resolve(), spec=spec, name=name, recipe=recipe,
                  dir=directory.resolve())
    problems: list[Problem] = []
    loaded: dict[str, Cell] = {}  # the first seed's recipes: a grid point's is its own
    for cell_name, values in cell_names(spec.grid, label):
        for seed in spec.seeds:
            overrides = {**spec.set, **values, **{k: seed for k in seed_keys},
                         "evaluate.arms": list(spec.arms)}
            cell = Cell(name=cell_name, values=values, seed=seed, overrides=overrides)
            if not inside(study.dir, cell.rel_dir):  # cell_names never gives one: kept so
                raise RecipeError([Problem(file=label, path="grid", message=(
                    f"cell folder {cell.rel_dir!r} would leave the study folder"))])
            try:
                found = load_recipe(recipe, overrides=overrides)
            except RecipeError as exc:
                problems += [p for p in _recipe_problems(exc, cell, spec, label)
                             if p not in problems]
            else:
                if seed == spec.seeds[0]:
                    same = loaded.setdefault(sha256_json(found.model_dump(mode="json")), cell)
                    if same is not cell:
                        problems.append(_same_recipe(same, cell, label))
            study.cells.append(cell)
    if problems:
        raise RecipeError(problems)
    return study


def _same_recipe(first: Cell, second: Cell, label: str) -> Problem:
    """Two grid points whose values the recipe resolves alike (lora_r 8 and '8'): one run
    twice, and a study that counts it as two cells."""
    differ = [k for k in first.values if first.values[k] != second.values[k]]
    said = "; ".join(f"{first.values[k]!r} and {second.values[k]!r}" for k in differ)
    return Problem(file=label, path=f"grid.{differ[0]}" if len(differ) == 1 else "grid",
                   message=f"{said} give the same recipe (cells {first.name} and {second.name} "
                           "would repeat one run); keep one")
