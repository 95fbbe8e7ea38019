"""Running a study's cells: one cell = one ordinary run directory `<study>/<cell>/seed-<n>/`,
run by the pipeline with the cell's overrides. Executors: sequential (default), Ray tasks
(`--executor ray`, resources from the study file), or printed `copa run` commands for any
other scheduler.

A cell is finished when its study-cell.json says so for the same inputs (base recipe content and
overrides) and its report.json exists: a re-run skips it. A killed study continues where it
stopped: an unfinished cell's completed stages are skipped by the pipeline's stage cache, and a
killed training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError

from copa.files import atomic_write_json, sha256_file, sha256_json
from copa.recipe import ARMS, Problem, RecipeError
from copa.recipe.load import _describe, _loc
from copa.runs import Emit
from copa.study.cells import inside
from copa.study.spec import Cell, Study
from copa.text import one_line

CELL_FILE = "study-cell.json"
PLAN_FILE = "plan.json"
# What a Ray worker needs from this process's environment (a worker on another machine, or
# started by a cluster, does not inherit it).
WORKER_ENV = ("MKL_CBWR", "HF_HUB_OFFLINE", "AXOLOTL_DO_NOT_TRACK", "TOKENIZERS_PARALLELISM",
              "TQDM_DISABLE", "COPA_DATA", "HF_HOME", "PYTHONPATH", "TRANSFORMERS_VERBOSITY",
              "COPA_TRACK", "COPA_TRACK_PARENT")


def cell_inputs(recipe: Path, cell: Cell) -> str:
    """What a finished cell's results came from (its record is believed only while equal)."""
    return sha256_json([str(recipe), sha256_file(recipe), cell.overrides])


def _record(directory: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((directory / CELL_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_finished(directory: Path, inputs: str) -> bool:
    record = _record(directory)
    return bool(record.get("finished") and record.get("inputs") == inputs
                and (directory / "report.json").is_file())


def run_cell(recipe: Path, study_dir: Path, cell: Cell, emit: Emit = print,
             share_models: bool = True) -> dict[str, Any]:
    """Run one cell to its report (skipped when finished). Returns what happened, as data."""
    from copa.pipeline import run_stages
    from copa.recipe.schema import DEFAULT_STRATEGY
    from copa.runs import open_run
    from copa.study.shared import (
        MODELS_DIR,
        ensure_model,
        has_model,
        has_plain_model,
        link_finetunes,
        link_model,
        link_plain_model,
    )
    from copa.track import tracking

    directory = Path(study_dir) / cell.rel_dir
    inputs = cell_inputs(recipe, cell)
    # where it ran: a Ray task runs in a worker process, maybe on another machine
    result = {"cell": cell.name, "seed": cell.seed, "dir": cell.rel_dir,
              "host": socket.gethostname(), "pid": os.getpid()}
    if is_finished(directory, inputs):
        emit("finished before: skipped")
        return {**result, "status": "skipped"}
    start = time.time()
    # wait: a second `copa study` on the same study waits for this cell, then finds it done
    with open_run(recipe, run_dir=directory, emit=emit, overrides=cell.overrides,
                  wait=True) as run:
        if is_finished(directory, inputs):
            emit("finished meanwhile: skipped")
            return {**result, "status": "skipped"}
        record = {"cell": cell.name, "values": cell.values, "seed": cell.seed,
                  "overrides": cell.overrides, "inputs": inputs, "finished": False}
        atomic_write_json(directory / CELL_FILE, record)
        if share_models and run.recipe.optimize.strategy != DEFAULT_STRATEGY:
            link_finetunes(directory, Path(study_dir))
        with tracking(run) as tracker:  # nested under the study's MLflow run (copa.track)
            # finetune.eval: the adapter depends on the cell's val split too; such a cell
            # trains in its own run directory (the shared model's key knows only the
            # training inputs)
            if share_models and run.finetunes and run.recipe.finetune.eval is None:
                run_stages(run, ["render"], tracker=tracker)
                if not has_model(run):  # a cell trained before (e.g. by `copa run`) keeps its own
                    link_model(run, ensure_model(run, Path(study_dir) / MODELS_DIR, emit))
                if run.trains_plain and not has_plain_model(run):  # = its seed's demo-free cell's
                    link_plain_model(run, ensure_model(run, Path(study_dir) / MODELS_DIR, emit,
                                                       rendered=run.rendered / "plain"))
            run_stages(run, tracker=tracker)
        seconds = round(time.time() - start, 2)
        atomic_write_json(directory / CELL_FILE, {**record, "finished": True, "seconds": seconds})
    return {**result, "status": "finished", "seconds": seconds}


def _guarded(recipe: Path, study_dir: Path, cell: Cell, emit: Emit) -> dict[str, Any]:
    """run_cell, a failure returned as data: one failed cell does not stop the others."""
    try:
        return run_cell(recipe, study_dir, cell, emit)
    except Exception as exc:  # reported per cell, and the study exits 1
        emit(f"FAILED: {type(exc).__name__}: {exc}")
        return {"cell": cell.name, "seed": cell.seed, "dir": cell.rel_dir, "status": "failed",
                "error": f"{type(exc).__name__}: {exc}"}


def _prefixed(emit: Emit, cell: Cell) -> Emit:
    return lambda message: emit(f"[{cell.rel_dir}] {message}")


def run_sequential(study: Study, cells: Sequence[Cell], emit: Emit = print
                   ) -> list[dict[str, Any]]:
    return [_guarded(study.recipe, study.dir, cell, _prefixed(emit, cell)) for cell in cells]


def _ray_cell(recipe: str, study_dir: str, cell: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: one cell in a worker process; its messages go to the worker's stdout, which
    Ray forwards to the driver."""
    one = Cell(**cell)
    return _guarded(Path(recipe), Path(study_dir), one,
                    _prefixed(lambda m: print(m, flush=True), one))


def run_ray(study: Study, cells: Sequence[Cell], emit: Emit = print,
            address: str | None = None) -> list[dict[str, Any]]:
    """Each cell a Ray task with the study's resources. Uses a Ray instance this process has
    started already, else connects to `address` (or RAY_ADDRESS), else starts a local one.
    Cells sharing a trained model wait on its lock: it is trained once."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: `pip install ray` (make install "
                           "installs it), or run the cells sequentially") from None

    started = not ray.is_initialized()
    if started:
        env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env} if env else None)
    try:
        task = ray.remote(_ray_cell).options(**study.spec.resources.ray_options())
        pending = {task.remote(str(study.recipe), str(study.dir),
                               {"name": c.name, "values": c.values, "seed": c.seed,
                                "overrides": c.overrides}): c for c in cells}
        options = study.spec.resources.ray_options()
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in options.items())
        emit(f"{len(pending)} cells submitted to Ray ({shown or 'num_cpus=1, Ray default'} "
             "each)")
        results = []
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done)
            try:
                result = ray.get(done)
            except Exception as exc:  # the worker died (a task's own errors come back as data)
                result = {"cell": cell.name, "seed": cell.seed, "dir": cell.rel_dir,
                          "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            emit(f"[{cell.rel_dir}] {result['status']}")
            results.append(result)
        order = {c.rel_dir: i for i, c in enumerate(cells)}
        return sorted(results, key=lambda r: order[r["dir"]])
    finally:
        if started:
            ray.shutdown()


# ---- the plan, and commands for other schedulers --------------------------------------------

def plan_data(study: Study) -> dict[str, Any]:
    """What `copa study --report DIR` needs to find and label every cell (plan.json)."""
    spec = study.spec
    return {"study": study.name, "file": str(study.file), "recipe": str(study.recipe),
            "grid": spec.grid, "seeds": spec.seeds, "arms": spec.arms,
            "bootstrap": spec.bootstrap,
            "cells": [{"name": c.name, "values": c.values, "seed": c.seed, "dir": c.rel_dir,
                       "overrides": c.overrides} for c in study.cells]}


def write_plan(study: Study) -> Path:
    path = study.dir / PLAN_FILE
    atomic_write_json(path, plan_data(study), sort_keys=False)
    return path


class _PlanCell(BaseModel):
    name: StrictStr
    values: dict[str, Any]
    seed: StrictInt
    dir: StrictStr


class _Plan(BaseModel):
    """plan.json as plan_data writes it (what the report reads of it)."""

    study: StrictStr
    file: StrictStr | None = None
    recipe: StrictStr
    grid: dict[str, list[Any]]
    seeds: list[StrictInt]
    arms: list[Literal[ARMS]]  # type: ignore[valid-type]
    bootstrap: StrictInt = Field(ge=1, le=1_000_000)
    cells: list[_PlanCell]


def read_plan(directory: Path) -> dict[str, Any]:
    """DIR/plan.json, checked as plan_data writes it: a cut or hand-edited plan is a
    RecipeError naming the file and key (the CLI's one line, exit 2), not a traceback; a cell
    folder outside DIR is refused (the report reads only the study's own runs)."""
    path = Path(directory) / PLAN_FILE
    redo = ("write it again with `copa study STUDY.yaml --print-commands --out "
            f"{shlex.quote(str(directory))}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(file=str(path), path="", message=(
            f"not readable JSON ({one_line(str(exc), 120)}); {redo}"))]) from None
    if not isinstance(raw, dict):
        raise RecipeError([Problem(file=str(path), path="", message=(
            f"not a study plan (a JSON mapping of study, cells, ...); {redo}"))])
    try:
        plan = _Plan.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([Problem(file=str(path), path=_loc(e["loc"]),
                                   message=f"{_describe(e)}; {redo}")
                           for e in exc.errors()]) from None
    for i, cell in enumerate(plan.cells):
        if not inside(Path(directory), cell.dir):
            raise RecipeError([Problem(file=str(path), path=f"cells[{i}].dir", message=(
                f"{cell.dir!r} is not a folder inside {directory}; {redo}"))])
    return plan.model_dump()


def set_value(value: Any) -> str:
    """A value as `--set key=VALUE` reads it back (YAML, as `copa run --set` parses it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    if text.endswith("\n...\n"):  # a plain scalar's document end marker
        text = text[:-len("\n...\n")]
    return text.strip()


def cell_command(study: Study, cell: Cell) -> str:
    """The `copa run` command of one cell (trains its own model: only `copa study` shares)."""
    parts = ["copa", "run", str(study.recipe), "--run-dir", str(study.dir / cell.rel_dir)]
    for key, value in cell.overrides.items():
        parts += ["--set", f"{key}={set_value(value)}"]
    return shlex.join(parts)
