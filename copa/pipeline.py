"""The pipeline: recipe -> render -> train -> merge -> (plain_finetune) -> optimize -> evaluate,
the only place that knows the order of stages (and, through copa.track, wraps them in an MLflow
run). Each stage (copa.stages) reads the previous stages' files in the run directory (copa.runs)
and writes its own; a stage whose content key is unchanged and whose artifacts are on disk is
skipped, and a stage is marked done only once its artifacts are complete. plain_finetune runs
only when the recipe's fine-tune saw demos.

RECORD is the stage record: each stage's name, its function, whether a recipe has it, and the
inputs its content key covers. The CLI's stage commands and `--force` choices come from it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from copa import precision, registry
from copa.files import sha256_file, sha256_json

if TYPE_CHECKING:
    from copa.runs import Emit, Run
    from copa.track import Tracker

# Light on import (the CLI builds its stage commands and --force choices from RECORD): the
# recipe, data and run-directory modules load when a key is computed or a stage runs.


def versions() -> dict[str, str]:
    """The installed versions a key holds (copa.runs.versions)."""
    from copa.runs import versions as installed

    return installed()


# ---- the inputs each stage's key covers -------------------------------------------------------
# A key is the hash of these lists: the same inputs give the same key, and a stage whose key and
# artifacts are unchanged is skipped. Keys of existing runs must not change (tests/test_stage_keys
# pins them): a recipe key added later is marked ADDED_LATER in the schema (copa.recipe.values).

def _template_text(run: Run) -> str:
    return run.checked.spec.template.text


def _render_inputs(run: Run) -> list[Any]:
    from copa.data.retrieval import corpus_identity as retrieval_identity
    from copa.data.sources import data_identity
    from copa.recipe import recipe_key_dict, recipe_section_dict

    r = run.recipe
    sections = ["model", "task", "data", "prompt", "finetune"]
    if r.optimize.order == "p->w":  # the training rows carry the prompt stage's demos
        sections += ["optimize", "evaluate", "serve"]
    # a RAG recipe: its settings and the corpus indexed, by content
    rag = [recipe_section_dict(r, "retrieve"), retrieval_identity(r)] if r.retrieve else []
    # The data's content, not just its name (a file edited in place re-renders the splits), and
    # the splits themselves (COPAOptimizer.compile renders the examples it is given).
    return [recipe_key_dict(r, *sections), _template_text(run), versions()["copa"],
            data_identity(r), sha256_json(run.checked.splits.as_dict()), *rag]


def _val_eval_inputs(run: Run) -> list[str]:
    """What finetune.eval scores val with, when set (it decides the adapter with early
    stopping): its settings, the metric and answer length, and the val rows and their prompts."""
    from copa.recipe import recipe_section_dict

    r = run.recipe
    if r.finetune.eval is None:
        return []
    return [sha256_json([recipe_section_dict(r, "task")["task"],
                         r.finetune.eval.model_dump(mode="json"),
                         r.finetune.early_stopping and r.finetune.early_stopping.model_dump(
                             mode="json"),
                         r.evaluate.metric, r.evaluate.max_tokens, r.data.answers_column,
                         sha256_file(run.rendered / "val.jsonl"),
                         sha256_file(run.rendered / "splits" / "val.jsonl")])]


def _training_inputs(rendered: Path, run: Run) -> list[Any]:
    from copa.runs import TRAIN_CONFIG, TRAIN_ROWS

    v = versions()
    return [sha256_file(rendered / TRAIN_CONFIG), sha256_file(rendered / TRAIN_ROWS),
            v["axolotl"], v["transformers"], v["torch"], v["peft"], *_val_eval_inputs(run)]


def _train_inputs(run: Run) -> list[Any]:
    return _training_inputs(run.rendered, run)


def _plain_finetune_inputs(run: Run) -> list[Any]:
    return _training_inputs(run.rendered_plain, run)


def _merge_inputs(run: Run) -> list[Any]:
    # with early stopping, which checkpoint training kept (the best on val)
    best = run.manifest.recorded("train").get("artifacts", {}).get("best_step")
    return [run.keys["train"], versions()["axolotl"],
            *([f"checkpoint-{best}"] if run.recipe.finetune.early_stopping else [])]


def _optimize_inputs(run: Run) -> list[Any]:
    from copa.recipe import recipe_key_dict
    from copa.recipe.schema import DEFAULT_STRATEGY

    r, v = run.recipe, versions()
    sections = ["model", "task", "optimize", "serve"]
    if r.optimize.strategy != DEFAULT_STRATEGY:  # BetterTogether's "w" fine-tunes in here
        sections += ["finetune"]
    return [run.keys.get("merge"), recipe_key_dict(r, *sections),
            r.evaluate.metric, r.evaluate.max_tokens, _template_text(run),
            sha256_file(run.rendered / "splits" / "train.jsonl"),
            sha256_file(run.rendered / "splits" / "val.jsonl"),
            sha256_file(run.rendered / "demos.json"), v["dspy"], v["copa"],
            # a RAG program retrieves from the index render built
            *([run.keys.get("render")] if r.retrieve else []),
            *precision.key_part(r.serve.precision),
            # which arms get a program: a run that left one out has none to reuse for it
            # (keyed only when one is left out, so runs with every arm keep their keys)
            *([optimized] if (optimized := [a for a in registry.OPTIMIZED_ARMS
                                             if a in r.evaluate.arms])
              != list(registry.OPTIMIZED_ARMS)
              else [])]


def _evaluate_inputs(run: Run) -> list[Any]:
    from copa.recipe import recipe_section_dict

    return [run.keys["optimize"], recipe_section_dict(run.recipe, "evaluate"),
            sha256_file(run.rendered / "splits" / "test.jsonl"),
            # the fair fine-tune-only arm's model, where one was trained
            *([run.keys["plain_finetune"]] if run.trains_plain else [])]


# ---- the stage record -------------------------------------------------------------------------

def _always(run: Run) -> bool:
    return True


def _finetunes(run: Run) -> bool:
    return run.finetunes


def _trains_plain(run: Run) -> bool:
    return run.trains_plain  # the recipe's fine-tune is demo-free already: it is the fair arm


def _prompts_first(run: Run) -> dict[str, Any]:
    """optimize.order p->w: the prompt stage's "p" runs on the base model before the training
    rows are rendered, and every row carries the demos it chose (render_stage's `demos`)."""
    if run.recipe.optimize.order != "p->w" or not run.finetunes:
        return {}
    _function("copa.stages.render:render_inputs")(run)  # the splits (and index) it reads
    run.emit("  p -> w: optimizing prompts on the base model first")
    demos = _function("copa.stages.optimize:prompt_first")(run)
    run.emit(f"  fine-tuning rows will carry the {len(demos)} demos it chose")
    return {"demos": demos}


def _no_arguments(run: Run) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # 'module:function'(run, **arguments) -> artifacts, imported when it runs
    key: Callable[[Run], list[Any]]  # the inputs its content key covers
    applies: Callable[[Run], bool] = _always  # whether this run has the stage at all
    arguments: Callable[[Run], dict[str, Any]] = _no_arguments  # run first, passed to function
    work: Callable[[Run], Path] | None = None  # cleared of checkpoints when its inputs change
    help: str | None = None  # the help of its own `copa <name>` command (None: no command)
    reads: tuple[str, ...] = ()  # the earlier stages whose artifacts it reads
    # the stages reading it hash its files into their keys: one it made stale whose key comes
    # out unchanged read the very same content, and is done as it was (render's rows, splits)
    content_keyed: bool = False


RECORD: tuple[Stage, ...] = (
    Stage("render", "copa.stages.render:render_stage", _render_inputs,
          arguments=_prompts_first, content_keyed=True),
    Stage("train", "copa.stages.train:train_stage", _train_inputs, applies=_finetunes,
          work=lambda run: run.train_dir, reads=("render",),
          help="Fine-tune with Axolotl (renders first if needed). LoRA on CPU, QLoRA on CUDA. "
               "A killed run resumes from its last checkpoint."),
    Stage("merge", "copa.stages.merge:merge_stage", _merge_inputs, applies=_finetunes,
          reads=("train",),
          help="Merge the trained adapter into a standalone model at runs/<name>/merged."),
    Stage("plain_finetune", "copa.stages.plain:plain_finetune_stage", _plain_finetune_inputs,
          applies=_trains_plain, work=lambda run: run.plain_dir / "train", reads=("render",)),
    Stage("optimize", "copa.stages.optimize:optimize_stage", _optimize_inputs,
          reads=("render", "merge"),
          help="Run the recipe's DSPy optimizer on the base and the merged model."),
    Stage("evaluate", "copa.stages.evaluate:evaluate_stage", _evaluate_inputs,
          reads=("render", "merge", "plain_finetune", "optimize"),
          help="Evaluate the four arms on the test split and write the report."),
)
STAGES = tuple(stage.name for stage in RECORD)  # in order
_BY_NAME = {stage.name: stage for stage in RECORD}


def dependents(stage: str) -> list[str]:
    """The later stages that read `stage`'s artifacts, directly or through another stage."""
    found: list[str] = []
    for later in RECORD[STAGES.index(stage) + 1:]:
        if any(read == stage or read in found for read in later.reads):
            found.append(later.name)
    return found


def stage_key(run: Run, stage: str) -> str:
    """A stage's content key: the hash of the inputs its record says it covers."""
    return sha256_json(_BY_NAME[stage].key(run))


def _function(path: str) -> Callable[..., Any]:
    """A stage's function, imported when it runs: torch, dspy and Axolotl load only then."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _invalidate(run: Run, stage: Stage, forced: bool = False) -> None:
    """A stage about to re-run with new inputs (or by --force): clear what its old run left
    behind, so Axolotl does not resume from checkpoints of other inputs."""
    if stage.work is None:
        return
    entry = run.manifest.stage(stage.name)
    if forced or (entry.get("key") and entry.get("key") != run.keys.get(stage.name)):
        work = stage.work(run)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "prepared", ignore_errors=True)


def _mark_stale(run: Run, name: str) -> None:
    """A stage about to write its artifacts anew: the finished stages that read them are no
    longer done (status 'stale'), so a run that stops before re-running them (a failure, `copa
    merge` alone) never shows their old report, program or scores as this run's."""
    for later in dependents(name):
        entry = run.manifest.recorded(later)
        if entry.get("status") == "done":
            entry.update({"status": "stale", "stale_since": [name]})
        elif entry.get("status") == "stale" and name not in entry.get("stale_since", []):
            entry["stale_since"] = [*entry.get("stale_since", []), name]
    run.manifest.save()


def _revive(run: Run, name: str, key: str) -> None:
    """A stale stage whose key is unchanged, made stale only by stages whose files its key
    hashes (render's), read the same content as when it ran: it is done again (a forced
    re-render of the same rows does not re-train)."""
    entry = run.manifest.recorded(name)
    causes = entry.get("stale_since", [])
    if (entry.get("status") == "stale" and entry.get("key") == key
            and all(_BY_NAME[c].content_keyed for c in causes if c in _BY_NAME)):
        entry["status"] = "done"
        entry.pop("stale_since", None)
        run.manifest.save()


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
    from copa.runs import now

    stage_run = tracker.stage if tracker is not None else _untracked
    last = max((STAGES.index(s) for s in stages), default=-1)
    for stage in RECORD[:last + 1]:
        name = stage.name
        if not stage.applies(run):
            continue
        key = stage_key(run, name)
        run.keys[name] = key
        _revive(run, name, key)
        if name not in force and is_current(run, name, key):
            run.emit(f"[{name}] unchanged, skipped")
            continue
        _invalidate(run, stage, forced=name in force)
        _mark_stale(run, name)
        run.emit(f"[{name}] running")
        entry = run.manifest.stage(name)
        entry.update({"key": key, "status": "running", "started": now()})
        entry.pop("ended", None)
        entry.pop("stale_since", None)
        run.manifest.save()
        start = time.time()
        try:
            with stage_run(name, key):
                artifacts = _function(stage.function)(run, **stage.arguments(run))
        except BaseException:
            entry["status"] = "failed"
            entry["ended"] = now()
            run.manifest.save()
            raise
        run.timings[name] = time.time() - start
        entry.update({"status": "done", "ended": now(), "seconds": round(run.timings[name], 2),
                      "artifacts": artifacts})
        run.manifest.save()
        run.emit(f"[{name}] done in {run.timings[name]:.1f}s")
    return run


def run(recipe_path: str | os.PathLike[str], *, stages: Sequence[str] = STAGES,
        force: Sequence[str] = (), run_dir: str | os.PathLike[str] | None = None,
        emit: Emit = print, overrides: dict[str, Any] | None = None,
        wait: bool = False) -> Run:
    """What `copa run` does: every stage in order (or the named ones and what they need), with
    the run directory locked throughout (busy: RunDirBusy, or with `wait`, wait for it)."""
    from copa.runs import open_run
    from copa.track import tracking

    with open_run(recipe_path, run_dir=run_dir, force=bool(force), emit=emit,
                  overrides=overrides, wait=wait) as opened, tracking(opened) as tracker:
        return run_stages(opened, stages, force, tracker)


@contextmanager
def _untracked(stage: str, key: str | None = None) -> Iterator[None]:
    yield
