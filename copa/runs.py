"""The run directory, its manifest, and one command at a time in it (each stage's content key:
copa.pipeline).

runs/<name>/
  manifest.json            per stage: key, status, times, artifacts
  rendered/                splits/, train.jsonl, val.jsonl, axolotl.yml, prompt_preview.txt,
                           retriever/ (a RAG recipe's index)
  train/                   checkpoints/ (Axolotl output_dir), axolotl-train.log
  merged/                  the standalone merged model
  plain/                   train/, merged/: the demo-free fine-tune beside a demo-trained one
                           (rendered/plain/ holds its rows and config)
  optimize/                program_<arm>.json, optimize.json
  report.json, report.md, report.png, predictions/<arm>.jsonl
  recipe.json              the recipe and prompt template the results came from (copa.load)
  .copa.lock, .copa.lock.json   held while a command works here; who holds it

One command at a time works in a run directory: open_run takes an OS-level file lock
(filelock: flock on Unix), which the OS releases when its process ends, even by SIGKILL, so a
killed holder never blocks the next command. The holder writes its pid, host, command and start
time next to the lock, for the message a second command prints.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from copa.checks import Checked, check_recipe
from copa.files import atomic_write_json
from copa.recipe import Problem, Recipe, RecipeError, load_recipe

Emit = Callable[[str], None]
TRAIN_CONFIG = "axolotl.yml"  # a rendered folder's training config (the backend's format)
TRAIN_ROWS = "train.jsonl"  # ... and its training rows, rendered as the prompts are
PLAIN_DIR = "plain"  # rendered/plain/, plain/: the demo-free fine-tune beside a demo-trained one


def versions() -> dict[str, str]:
    found = {}
    for name in ("copa", "axolotl", "dspy", "transformers", "torch", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        if path.is_file():
            return cls(path, json.loads(path.read_text()))
        return cls(path, {"stages": {}})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("stages", {}).setdefault(name, {})

    def recorded(self, name: str) -> dict[str, Any]:
        """A stage's entry to read, without adding an empty one for a stage that never ran
        (a recipe without fine-tuning has no train entry)."""
        return self.data.get("stages", {}).get(name, {})

    def is_done(self, name: str, key: str) -> bool:
        entry = self.recorded(name)
        return entry.get("status") == "done" and entry.get("key") == key

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


@dataclass
class Run:
    """A recipe bound to its run directory."""

    recipe: Recipe
    checked: Checked
    dir: Path
    manifest: Manifest
    emit: Emit = print
    keys: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    lock: filelock.BaseFileLock | None = field(default=None, repr=False)

    def close(self) -> None:
        """Let other commands work in the run directory again."""
        if self.lock is not None:
            release_run_dir(self.dir, self.lock)
            self.lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    @property
    def rendered(self) -> Path:
        return self.dir / "rendered"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def plain_dir(self) -> Path:
        """The demo-free fine-tune trained beside a demo-trained one (train/, merged/)."""
        return self.dir / PLAIN_DIR

    @property
    def rendered_plain(self) -> Path:
        """The demo-free fine-tune's rows and config, when render wrote them."""
        return self.rendered / PLAIN_DIR

    @property
    def plain_merged(self) -> Path:
        return self.plain_dir / "merged"

    @property
    def trains_plain(self) -> bool:
        """Whether the render stage asked for a demo-free fine-tune beside the recipe's
        demo-trained one (its rows and config are in rendered/plain/)."""
        return self.finetunes and (self.rendered_plain / TRAIN_CONFIG).is_file()

    @property
    def optimize_dir(self) -> Path:
        return self.dir / "optimize"

    @property
    def finetunes(self) -> bool:
        return self.recipe.finetune.enabled


def run_dir_for(recipe: Recipe, override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if recipe.run_dir:
        return recipe.resolve(recipe.run_dir)
    return Path.cwd() / "runs" / recipe.name


# ---- one command at a time in a run directory -------------------------------------------------

LOCK_NAME = ".copa.lock"
HOLDER_NAME = ".copa.lock.json"


class RunDirBusy(Exception):
    """Another process works in this run directory (the CLI exits 2 with this message)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe_holder(directory: Path) -> str:
    """Who holds the run directory's lock, from the info its holder wrote. Info that a killed
    holder left behind (its pid is gone) is not believed: the lock's real holder has taken it
    but not yet written its own."""
    try:
        info = json.loads((directory / HOLDER_NAME).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    if host == socket.gethostname() and not _alive(pid):
        return "another process"
    return f"pid {pid} on {host} (`{info.get('command', '?')}`, since {info.get('since', '?')})"


def lock_run_dir(directory: Path, wait: bool = False, emit: Emit = print,
                 command: str | None = None) -> filelock.BaseFileLock:
    """Take the run directory's lock, creating the directory. Busy: raise RunDirBusy, or with
    `wait` say who holds it and wait until it is free."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(directory / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = describe_holder(directory)
        if not wait:
            raise RunDirBusy(f"{directory}: in use by {holder}; wait until it ends or pass "
                             "--wait (a killed holder frees it at once)") from None
        emit(f"waiting for {directory}: in use by {holder}")
        lock.acquire()
    try:
        atomic_write_json(directory / HOLDER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(), "since": now(),
            "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])})
    except BaseException:
        lock.release()
        raise
    return lock


def release_run_dir(directory: Path, lock: filelock.BaseFileLock) -> None:
    (directory / HOLDER_NAME).unlink(missing_ok=True)  # before the lock: never a stale claim
    lock.release()


@contextmanager
def run_dir_locked(directory: Path, wait: bool = False, emit: Emit = print) -> Iterator[None]:
    """Hold the run directory's lock for a block (commands that write there without a Run)."""
    lock = lock_run_dir(directory, wait=wait, emit=emit)
    try:
        yield
    finally:
        release_run_dir(directory, lock)


def open_run(recipe_path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None,
             force: bool = False, emit: Emit = print,
             overrides: dict[str, Any] | None = None, wait: bool = False) -> Run:
    """Load and check the recipe and claim its run directory: the Run holds the directory's
    lock until `run.close()` (or the end of a `with open_run(...) as run:` block)."""
    recipe = load_recipe(recipe_path, overrides=overrides)
    checked = check_recipe(recipe)
    directory = run_dir_for(recipe, run_dir).resolve()
    lock = lock_run_dir(directory, wait=wait, emit=emit)
    try:  # the manifest is read under the lock: a waiting command sees what the holder wrote
        manifest = Manifest.load(directory / "manifest.json")
        owner = manifest.data.get("recipe")
        here = str(recipe.source_path)
        if owner and owner != here and not force and not Path(owner).exists():
            # a run directory copied from another machine or checkout: its recipe is not here
            # to run in it, so this one takes it over (the stage keys still decide what re-runs)
            emit(f"run directory {directory} was made by recipe {owner}, which is not on this "
                 f"machine: it now belongs to {here}")
        elif owner and owner != here and not force:
            raise RecipeError([Problem(
                file=str(recipe_path), path="name",
                message=f"run directory {directory} belongs to recipe {owner}; "
                        "rename this recipe, set run_dir, or pass --force")])
    except BaseException:
        release_run_dir(directory, lock)
        raise
    manifest.data["recipe"] = here
    manifest.data["name"] = recipe.name
    return Run(recipe=recipe, checked=checked, dir=directory, manifest=manifest, emit=emit,
               lock=lock)

