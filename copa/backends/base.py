"""What every training backend shares, and all that code outside copa/backends/ may know of
one: the Backend protocol, the hardware a training sees, and the error a failed training
raises. Light: nothing here imports a training library."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class TrainError(Exception):
    """The backend failed; `tail` holds its last meaningful lines, `log` the full log path."""

    def __init__(self, message: str, log: Path | None = None, tail: str = ""):
        self.log, self.tail = log, tail
        text = message
        if tail:
            text += "\n" + tail
        if log:
            text += f"\nfull log: {log}"
        super().__init__(text)


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    gpus: int = 0
    flash_attention: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        forced = os.environ.get("COPA_DEVICE")
        if forced == "cpu":
            return cls(cuda=False)
        import torch

        if forced == "cuda" or torch.cuda.is_available():
            try:
                import flash_attn  # noqa: F401

                flash = True
            except ImportError:
                flash = False
            return cls(cuda=True, gpus=max(1, torch.cuda.device_count()), flash_attention=flash)
        return cls(cuda=False)


class Backend(Protocol):
    """A trainer: its config rendered from a recipe (data: a dict, written as a file the
    stages hash for their keys), then train (config -> adapter folder) and merge (adapter ->
    standalone model folder)."""

    name: str

    def checked_config(self, recipe: Any, base_model: str, train_path: Path, work_dir: Path,
                       hardware: Hardware | None = None, label: str | None = None,
                       validate: bool = True) -> dict[str, Any]: ...

    def relocated_config(self, config: dict[str, Any], train_path: Path, work_dir: Path
                         ) -> dict[str, Any]: ...

    def write_config(self, config: dict[str, Any], path: Path) -> None: ...

    def steps_for(self, recipe: Any, train_rows: int) -> int: ...

    # on_process: gets each subprocess the backend starts (a caller may kill it to cancel);
    # val_eval: copa.backends.valcurve's spec, to score val while training (finetune.eval)
    def train(self, recipe: Any, config_path: Path, work_dir: Path,
              emit: Callable[[str], None], total_steps: int | None,
              on_process: Callable[[Any], None] | None = None,
              val_eval: Path | None = None) -> Path: ...

    def merge(self, config_path: Path, adapter_dir: Path, merged_dir: Path,
              work_dir: Path, on_process: Callable[[Any], None] | None = None) -> Path: ...

    # whether a folder holds a finished adapter (a killed training's folder does not)
    def has_adapter(self, folder: Path) -> bool: ...
