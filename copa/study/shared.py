"""Trained models shared between a study's cells.

Cells whose training inputs are equal (a grid over `optimize:` only, or cells that differ in
nothing the training rows or the Axolotl config see) train once. The model lives in
`<study>/models/<train key>/`, named by the train stage's content with the run directory's own
paths taken out (the rendered axolotl.yml names the cell's folders; the training does not
depend on them):

    models/<key>/
      axolotl.yml, train.jsonl   the first cell's rendered config and rows, re-pointed here
      train/                     checkpoints/ (a killed training resumes from them), logs
      merged/                    the standalone merged model
      model.json                 written last: key, adapter, merged, seconds (= complete)

A cell then records its train and merge stages in its own manifest as done, under its own
stage keys, with the shared folder's artifacts, and `merged` in the cell is a relative symlink
to the shared one: the pipeline's cache rule (same key, artifacts on disk) skips both stages
and every later stage reads the model where it is. The folder is locked while a cell trains in
it (copa.runs' run-directory lock); a second cell wanting the same model waits, then reuses it.

BetterTogether's own fine-tunes (optimize.strategy) are shared the same way: a cell's
`finetunes` is a relative symlink to `<study>/finetunes/`, where each fine-tune already has a
folder named by its content.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from copa.files import atomic_write_bytes, atomic_write_json, sha256_file, sha256_json
from copa.pipeline import is_current, stage_key
from copa.runs import TRAIN_CONFIG, TRAIN_ROWS, Emit, Run, now, run_dir_locked, versions

MODELS_DIR = "models"
FINETUNES_DIR = "finetunes"
MODEL_INFO = "model.json"
_NOWHERE = Path("/shared-model")  # stands in for the place in the key


def shared_train_key(rendered: Path) -> str:
    """The train stage's inputs (copa.pipeline.stage_key 'train') without the run directory's
    paths: the Axolotl config re-pointed at one fixed place, the rows, the versions."""
    from copa.backends import get_backend

    config = yaml.safe_load((rendered / TRAIN_CONFIG).read_text())
    placed = get_backend().relocated_config(config, _NOWHERE / TRAIN_ROWS, _NOWHERE / "train")
    v = versions()
    return sha256_json([placed, sha256_file(rendered / TRAIN_ROWS), v["axolotl"],
                        v["transformers"], v["torch"], v["peft"]])


def model_folder(models_dir: Path, key: str) -> Path:
    return Path(models_dir) / key[:16]


def read_model_info(folder: Path) -> dict[str, Any] | None:
    """model.json of a complete shared model, or None."""
    try:
        info = json.loads((folder / MODEL_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not (Path(info.get("merged", "")) / "config.json").is_file():
        return None
    return info


def ensure_model(run: Run, models_dir: Path, emit: Emit = print,
                 rendered: Path | None = None) -> Path:
    """The trained and merged model for this rendered run (or for the rows and config in
    `rendered`: the demo-free fine-tune's rendered/plain/), trained in the shared folder unless
    it is there already (under the folder's lock: never twice, even from cells running at
    once). Returns the folder."""
    from copa.backends import get_backend
    from copa.data import read_jsonl

    rendered = Path(rendered or run.rendered)
    key = shared_train_key(rendered)
    folder = model_folder(models_dir, key)
    with run_dir_locked(folder, wait=True, emit=emit):
        info = read_model_info(folder)
        if info is not None and info.get("key") == key:
            emit(f"  trained model {folder.name} is shared: reused")
            return folder
        emit(f"  training the shared model {folder.name}")
        start = time.time()
        atomic_write_bytes(folder / TRAIN_ROWS, (rendered / TRAIN_ROWS).read_bytes())
        config = yaml.safe_load((rendered / TRAIN_CONFIG).read_text())
        backend = get_backend()
        backend.write_config(backend.relocated_config(config, folder / TRAIN_ROWS,
                                                      folder / "train"),
                             folder / TRAIN_CONFIG)
        adapter = folder / "train" / "checkpoints"
        if backend.has_adapter(adapter):  # the weights are written at the end of training
            emit("  its training finished before (the merge did not): merging only")
        else:  # a killed training resumes from its last checkpoint
            rows = len(read_jsonl(folder / TRAIN_ROWS))
            adapter = backend.train(run.recipe, folder / TRAIN_CONFIG, folder / "train",
                                    emit=emit, total_steps=backend.steps_for(run.recipe, rows))
        emit(f"  merging into {folder.name}/merged")
        merged = backend.merge(folder / TRAIN_CONFIG, adapter, folder / "merged",
                               folder / "train")
        atomic_write_json(folder / MODEL_INFO, {
            "key": key, "adapter": str(adapter), "merged": str(merged),
            "log": str(folder / "train" / "axolotl-train.log"), "trained_for": str(run.dir),
            "ended": now(), "seconds": round(time.time() - start, 2), "versions": versions()})
        return folder


def has_model(run: Run) -> bool:
    """Whether the run's train and merge stages are current already (its own model, or a
    shared one linked before): nothing to train or link."""
    keys = {"train": stage_key(run, "train")}
    run.keys["train"] = keys["train"]
    keys["merge"] = stage_key(run, "merge")
    return all(is_current(run, stage, key) for stage, key in keys.items())


def has_plain_model(run: Run) -> bool:
    """Whether the run's demo-free fine-tune (plain_finetune) is current already."""
    run.keys["plain_finetune"] = stage_key(run, "plain_finetune")
    return is_current(run, "plain_finetune", run.keys["plain_finetune"])


def link_plain_model(run: Run, folder: Path) -> None:
    """Record a shared model as this run's demo-free fine-tune: a cell fine-tuned with demos
    borrows the model its seed's demo-free cell trained (the same rows and config)."""
    info = read_model_info(folder)
    if info is None:
        raise FileNotFoundError(f"{folder}: no complete shared model ({MODEL_INFO})")
    run.plain_dir.mkdir(parents=True, exist_ok=True)
    _symlink(run.plain_merged, os.path.relpath(folder / "merged", run.plain_dir))
    run.keys["plain_finetune"] = stage_key(run, "plain_finetune")
    entry = run.manifest.stage("plain_finetune")
    entry.clear()
    entry.update({"key": run.keys["plain_finetune"], "status": "done", "ended": now(),
                  "artifacts": {"adapter": info["adapter"], "model": str(run.plain_merged),
                                "log": info["log"]},
                  "shared_model": str(folder)})
    run.manifest.save()


def _symlink(link: Path, target: str) -> None:
    """link -> target, replacing whatever link was, in one rename."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def link_finetunes(run_dir: Path, study_dir: Path) -> None:
    """A BetterTogether cell's fine-tunes (optimize.strategy other than w -> p) go to the
    study's finetunes/: each is in a folder named by its content (rows, settings, base model,
    versions; copa.provider.finetune), so cells that hand over the same rows (p -> w and
    p -> w -> p on one seed) train once, under the folder's lock. A cell that fine-tuned in a
    folder of its own before keeps it."""
    own, shared = Path(run_dir) / FINETUNES_DIR, Path(study_dir) / FINETUNES_DIR
    if own.exists() and not own.is_symlink():
        return
    shared.mkdir(parents=True, exist_ok=True)
    _symlink(own, os.path.relpath(shared, run_dir))


def link_model(run: Run, folder: Path) -> None:
    """Record the shared model as this run's train and merge stages (see the module doc)."""
    info = read_model_info(folder)
    if info is None:
        raise FileNotFoundError(f"{folder}: no complete shared model ({MODEL_INFO})")
    _symlink(run.merged, os.path.relpath(folder / "merged", run.dir))
    for stage, artifacts in (("train", {"adapter": info["adapter"], "log": info["log"]}),
                             ("merge", {"model": str(run.merged)})):
        run.keys[stage] = stage_key(run, stage)
        entry = run.manifest.stage(stage)
        entry.clear()
        entry.update({"key": run.keys[stage], "status": "done", "ended": now(),
                      "artifacts": artifacts, "shared_model": str(folder)})
    run.manifest.save()
