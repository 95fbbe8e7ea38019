"""Training backends. The pipeline and COPAOptimizer know a backend only through `Backend`:
train (rendered config -> adapter folder) and merge (adapter -> standalone model folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class Backend(Protocol):
    name: str

    # on_process: gets each subprocess the backend starts (a caller may kill it to cancel);
    # val_eval: copa.backends.valcurve's spec, to score val while training (finetune.eval)
    def train(self, recipe: Any, config_path: Path, work_dir: Path,
              emit: Callable[[str], None], total_steps: int | None,
              on_process: Callable[[Any], None] | None = None,
              val_eval: Path | None = None) -> Path: ...

    def merge(self, config_path: Path, adapter_dir: Path, merged_dir: Path,
              work_dir: Path, on_process: Callable[[Any], None] | None = None) -> Path: ...

    # how many optimizer steps training on train_rows rows takes (the progress bar's total)
    def steps_for(self, recipe: Any, train_rows: int) -> int: ...


class AxolotlBackend:
    """The real `axolotl train` / `axolotl merge-lora` CLIs, as subprocesses."""

    name = "axolotl"

    def train(self, recipe: Any, config_path: Path, work_dir: Path,
              emit: Callable[[str], None], total_steps: int | None,
              on_process: Callable[[Any], None] | None = None,
              val_eval: Path | None = None) -> Path:
        from copa.backends import axolotl

        return axolotl.train(recipe, config_path, work_dir, emit=emit, total_steps=total_steps,
                             on_process=on_process, val_eval=val_eval)

    def merge(self, config_path: Path, adapter_dir: Path, merged_dir: Path,
              work_dir: Path, on_process: Callable[[Any], None] | None = None) -> Path:
        from copa.backends import axolotl

        return axolotl.merge(config_path, adapter_dir, merged_dir, work_dir,
                             on_process=on_process)

    def steps_for(self, recipe: Any, train_rows: int) -> int:
        from copa.backends import axolotl

        return axolotl.steps_for(recipe, train_rows)


def get_backend(name: str = "axolotl") -> Backend:
    if name == "axolotl":
        return AxolotlBackend()
    raise ValueError(f"unknown training backend {name!r}")
