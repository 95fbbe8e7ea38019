"""What `copa study` does: read the study, write its plan, run the cells with an executor,
then aggregate every finished cell into study.json / study.md / study.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from copa.runs import Emit
from copa.study.aggregate import aggregate
from copa.study.execute import (
    PLAN_FILE,
    cell_command,
    read_plan,
    run_ray,
    run_sequential,
    write_plan,
)
from copa.study.spec import Cell, Study, load_study, read_study_file
from copa.study.write import write_study
from copa.track import study_results, study_tracking

EXECUTORS = ("sequential", "ray")


def run_order(study: Study) -> list[Cell]:
    """Cells in the order they run: every cell's first seed, then every cell's second, ... A
    study stopped halfway has the whole grid on its first seeds, not a few cells on all of
    them (the reports still list cells grid-first)."""
    seeds = study.spec.seeds
    return sorted(study.cells, key=lambda cell: seeds.index(cell.seed))


def planned(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
            seeds: list[int] | None = None) -> tuple[Study, list[Cell]]:
    """The study as planned and reported (the file's seeds, then any other seed given) and the
    cells to run now (the given seeds' only, if any). `copa study --seeds 0`, then `--seeds 1`,
    then `--seeds 2` ends with a report over all three, not over the last one."""
    if seeds is None:
        study = load_study(path, out_dir)
        return study, run_order(study)
    file_seeds = read_study_file(path).seeds
    read_study_file(path, seeds)  # the given list checked as the file's would be (no repeats)
    study = load_study(path, out_dir, file_seeds + [s for s in seeds if s not in file_seeds])
    return study, [cell for cell in run_order(study) if cell.seed in seeds]


def study_commands(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                   seeds: list[int] | None = None) -> tuple[Study, list[str]]:
    """One `copa run ... --set ...` line per cell to run, for another scheduler; writes
    plan.json so that `copa study --report DIR` finds the cells afterwards."""
    study, cells = planned(path, out_dir, seeds)
    write_plan(study)
    return study, [cell_command(study, cell) for cell in cells]


def run_study(path: str | os.PathLike[str], executor: str = "sequential",
              out_dir: str | os.PathLike[str] | None = None, emit: Emit = print,
              ray_address: str | None = None, seeds: list[int] | None = None
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every cell (finished ones skipped), then the study files. Returns study.json's data and
    what happened to each cell run now (a failed cell is reported, the others still run).
    `seeds` chooses which seeds run now; the study files cover every seed that finished."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    study, cells = planned(path, out_dir, seeds)
    track = preflight(study)
    write_plan(study)
    now = len({cell.seed for cell in cells})
    emit(f"study {study.name}: {len(cells)} runs ({len(cells) // max(now, 1)} cells x {now} "
         f"seeds) in {study.dir}")
    params = {"study.file": str(study.file), "study.recipe": str(study.recipe),
              "study.grid": json.dumps(study.spec.grid, default=str),
              "study.seeds": json.dumps(study.spec.seeds), "study.executor": executor}
    # an MLflow parent run: each cell's run nests under it (copa.track)
    with study_tracking(study.name, track, study.dir, params, emit) as tracker:
        if executor == "ray":
            results = run_ray(study, cells, emit, ray_address)
        else:
            results = run_sequential(study, cells, emit)
        data = report_study(study.dir)
        study_results(tracker, study.dir, data)
    return data, results


def preflight(study: Study) -> Any:
    """What `copa run` checks before training (model, data files, template, one rendered row),
    on the first cell, before any cell runs: a problem every cell shares (a missing data file)
    is one clear error up front, not the same failure once per cell. Returns the recipe's
    track: setting."""
    from copa.checks import check_recipe
    from copa.recipe import load_recipe

    if not study.cells:
        return False
    recipe = load_recipe(study.recipe, overrides=study.cells[0].overrides)
    check_recipe(recipe)
    return recipe.track  # the study's MLflow run goes where its cells' runs go


def report_study(study_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Aggregate the finished cells named in DIR/plan.json and (re)write the study files."""
    directory = Path(study_dir)
    plan_path = directory / PLAN_FILE
    if not plan_path.is_file():
        from copa.recipe import Problem, RecipeError

        raise RecipeError([Problem(file=str(directory), path="", message=(
            f"not a study folder: it has no {PLAN_FILE} (run `copa study STUDY.yaml` or "
            "--print-commands first)"))])
    data = aggregate(read_plan(directory), directory)
    write_study(directory, data)
    return data
