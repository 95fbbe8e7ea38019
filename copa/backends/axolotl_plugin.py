"""The Axolotl plugin named in every config copa renders. Imported inside the training process only.

- Seeds the random streams right before the LoRA adapter is created. Axolotl seeds only when it
  builds the HF Trainer, after the adapter exists, so LoRA's random A matrices were drawn
  unseeded: the same recipe and `seed` trained to different weights (measured: identical step-1
  loss, step-1 grad norms from 6.57 to 6.81 over four runs).
- Registers a TrainerCallback that writes one JSON line per logging step (step, max steps, loss,
  learning rate, epoch, time) to the file named by $COPA_PROGRESS_FILE, which copa's parent
  process reads for its progress display: no parsing of log lines, and a `nan` loss is reported
  as such instead of being dropped.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from copa.backends.progress import PROGRESS_ENV


class ProgressFile(TrainerCallback):
    """Appends training events as JSON lines (main process only, flushed per line)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, state: Any, event: str, logs: dict[str, Any] | None = None) -> None:
        if not state.is_world_process_zero:
            return
        record: dict[str, Any] = {"event": event, "step": state.global_step,
                                  "max_steps": state.max_steps, "epoch": state.epoch,
                                  "time": time.time()}
        for key in ("loss", "learning_rate", "grad_norm", "world_size"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)):
                # JSON has no NaN: a diverged loss travels as the string "nan" and stays visible.
                record[key] = float(value) if math.isfinite(value) else str(value)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        # How many processes really train together (seen by torch, not only by the launcher).
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._write(state, "begin", {"world_size": world})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._write(state, "step", logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state, "end")


def place_ranks_on_cpu() -> None:
    """Data-parallel training on CPU. Axolotl 0.19 maps each rank's model to device index
    LOCAL_RANK whenever WORLD_SIZE > 1 (utils/config normalize_config), an accelerator index that
    fails on a machine without one ("Cannot access accelerator device when none is available");
    on such a machine each rank loads its model on the CPU instead (gloo does the all-reduce)."""
    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_device_map_config
    if getattr(original, "copa_cpu", False):
        return

    def set_device_map_config(loader: Any) -> None:
        original(loader)
        if "device_map" in loader.model_kwargs:
            loader.model_kwargs["device_map"] = "cpu"

    set_device_map_config.copa_cpu = True  # type: ignore[attr-defined]
    ModelLoader._set_device_map_config = set_device_map_config


class CopaPlugin(BasePlugin):
    def register(self, cfg: Any) -> None:
        place_ranks_on_cpu()

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        from transformers import set_seed

        set_seed(int(cfg.seed) if cfg.seed is not None else 42)

    def get_training_args(self, cfg: Any) -> dict[str, Any]:
        import torch

        # Without CUDA, tell HF's Trainer it runs on the CPU: then several processes form one
        # gloo process group (rank 0 logs, data is sharded) and bf16 is allowed on CPU.
        return {} if torch.cuda.is_available() else {"use_cpu": True}

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        path = os.environ.get(PROGRESS_ENV)
        return [ProgressFile(path)] if path else []
