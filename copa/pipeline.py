"""The pipeline: recipe -> render -> train -> merge -> (plain_finetune) -> optimize -> evaluate,
the only place that knows the order of stages (and, through copa.track, wraps them in an MLflow
run). Each stage (copa.stages) reads the previous stages' files in the run directory (copa.runs)
and writes its own; a stage whose content key is unchanged and whose artifacts are on disk is
skipped, and a stage is marked done only once its artifacts are complete. plain_finetune runs
only when the recipe's fine-tune saw demos.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from copa.runs import Emit, Run, now, open_run, stage_key
from copa.track import Tracker, tracking

STAGES = ("render", "train", "merge", "plain_finetune", "optimize", "evaluate")


def _stage_function(stage: str) -> Callable[[Run], dict[str, Any]]:
    """A stage's function, imported when it runs: torch, dspy and Axolotl load only then."""
    if stage == "render":
        from copa.stages.render import render_stage as func
    elif stage == "train":
        from copa.stages.train import train_stage as func
    elif stage == "merge":
        from copa.stages.merge import merge_stage as func
    elif stage == "plain_finetune":
        from copa.stages.plain import plain_finetune_stage as func
    elif stage == "optimize":
        from copa.stages.optimize import optimize_stage as func
    elif stage == "evaluate":
        from copa.stages.evaluate import evaluate_stage as func
    else:
        raise ValueError(stage)
    return func


def _invalidate(run: Run, stage: str, forced: bool = False) -> None:
    """A stage about to re-run with new inputs (or by --force): clear what its old run left
    behind, so Axolotl does not resume from checkpoints of other inputs."""
    if stage in ("train", "plain_finetune"):
        entry = run.manifest.stage(stage)
        work = run.train_dir if stage == "train" else run.plain_dir / "train"
        if forced or (entry.get("key") and entry.get("key") != run.keys.get(stage)):
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            shutil.rmtree(work / "prepared", ignore_errors=True)


def _paths(artifacts: Any) -> list[Path]:
    if isinstance(artifacts, dict):
        return [p for value in artifacts.values() for p in _paths(value)]
    return [Path(artifacts)] if isinstance(artifacts, str) else []


def is_current(run: Run, stage: str, key: str) -> bool:
    """Done with this very key, and every artifact it recorded is still on disk."""
    if not run.manifest.is_done(stage, key):
        return False
    return all(path.exists() for path in _paths(run.manifest.stage(stage).get("artifacts")))


def run_stages(run: Run, stages: Sequence[str] = STAGES, force: Sequence[str] = (),
               tracker: Tracker | None = None) -> Run:
    """Run the named stages and every stage before them, in order; a stage whose key is
    unchanged and whose artifacts are on disk is skipped (keys chain, so a changed stage makes
    everything after it re-run). A tracker (copa.track) gets a nested run per stage that runs."""
    stage_run = tracker.stage if tracker is not None else _untracked
    last = max((STAGES.index(s) for s in stages), default=-1)
    for stage in STAGES[:last + 1]:
        if not run.finetunes and stage in ("train", "merge"):
            continue
        if stage == "plain_finetune" and not run.trains_plain:
            continue  # the recipe's fine-tune is demo-free already: it is the fair arm
        key = stage_key(run, stage)
        run.keys[stage] = key
        if stage not in force and is_current(run, stage, key):
            run.emit(f"[{stage}] unchanged, skipped")
            continue
        _invalidate(run, stage, forced=stage in force)
        run.emit(f"[{stage}] running")
        entry = run.manifest.stage(stage)
        entry.update({"key": key, "status": "running", "started": now()})
        entry.pop("ended", None)
        run.manifest.save()
        start = time.time()
        try:
            with stage_run(stage, key):
                artifacts = _stage_function(stage)(run)
        except BaseException:
            entry["status"] = "failed"
            entry["ended"] = now()
            run.manifest.save()
            raise
        run.timings[stage] = time.time() - start
        entry.update({"status": "done", "ended": now(), "seconds": round(run.timings[stage], 2),
                      "artifacts": artifacts})
        run.manifest.save()
        run.emit(f"[{stage}] done in {run.timings[stage]:.1f}s")
    return run


def run(recipe_path: str | os.PathLike[str], *, stages: Sequence[str] = STAGES,
        force: Sequence[str] = (), run_dir: str | os.PathLike[str] | None = None,
        emit: Emit = print, overrides: dict[str, Any] | None = None,
        wait: bool = False) -> Run:
    """What `copa run` does: every stage in order (or the named ones and what they need), with
    the run directory locked throughout (busy: RunDirBusy, or with `wait`, wait for it)."""
    with open_run(recipe_path, run_dir=run_dir, force=bool(force), emit=emit,
                  overrides=overrides, wait=wait) as opened, tracking(opened) as tracker:
        return run_stages(opened, stages, force, tracker)


@contextmanager
def _untracked(stage: str, key: str | None = None) -> Iterator[None]:
    yield
