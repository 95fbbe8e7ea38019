"""The Axolotl plugin named in every config copa renders. Imported inside the training process only.

- Seeds the random streams right before the LoRA adapter is created. Axolotl seeds only when it
  builds the HF Trainer, after the adapter exists, so LoRA's random A matrices were drawn
  unseeded: the same recipe and `seed` trained to different weights (measured: identical step-1
  loss, step-1 grad norms from 6.57 to 6.81 over four runs).
- Registers a TrainerCallback that writes one JSON line per logging step (step, max steps, loss,
  learning rate, epoch, time) to the file named by $COPA_PROGRESS_FILE, which copa's parent
  process reads for its progress display: no parsing of log lines, and a `nan` loss is reported
  as such instead of being dropped.
- With finetune.eval, registers ValEvaluation: every N steps the first process scores the val
  split with the recipe's metric on greedy answers of the model being trained (the prompts the
  rows were rendered with), records the evaluation, and with finetune.early_stopping decides
  whether to stop; every process receives that decision, so all stop at the same step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from copa.backends import valcurve
from copa.backends.progress import PROGRESS_ENV


class ProgressFile(TrainerCallback):
    """Appends training events as JSON lines (main process only, flushed per line)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, state: Any, event: str, logs: dict[str, Any] | None = None) -> None:
        fields = {key: (logs or {}).get(key)
                  for key in ("loss", "learning_rate", "grad_norm", "world_size")}
        self.write(state, event, {k: v for k, v in fields.items()
                                  if isinstance(v, (int, float))})

    def write(self, state: Any, event: str, fields: dict[str, Any]) -> None:
        """One event line (first process only); a non-finite number travels as its string."""
        if not state.is_world_process_zero:
            return
        record: dict[str, Any] = {"event": event, "step": state.global_step,
                                  "max_steps": state.max_steps, "epoch": state.epoch,
                                  "time": time.time()}
        for key, value in fields.items():
            # JSON has no NaN: a diverged loss travels as the string "nan" and stays visible.
            finite = not isinstance(value, float) or math.isfinite(value)
            record[key] = value if finite else str(value)
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


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]],
                   max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers of the model being trained, prompted as the inference engine prompts
    (chat template with the generation prompt, no extra special tokens), each answer cut at its
    first end-of-turn token. Left-padded batches: on a near-tie a row's answer may differ from
    the engine's one-at-a-time answer; the prompt stage re-scores the merged model on val."""
    import torch
    import transformers

    from copa.models import end_token_ids

    end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    config = transformers.GenerationConfig(  # fresh: no sampling settings merged in
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=sorted(end_ids), pad_token_id=pad_id, use_cache=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = [tokenizer(tokenizer.apply_chat_template(
                            chat, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
                        for chat in prompts[start:start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                    device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for row in out[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
                    answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False))
    finally:
        if was_training:
            model.train()
    return answers


def _broadcast(value: Any) -> Any:
    """The first process's value, on every process (itself when training runs alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ValEvaluation(TrainerCallback):
    """finetune.eval / finetune.early_stopping inside the Trainer (see copa.backends.valcurve).

    At an evaluation step (every N steps and the last) it asks for that step's loss to be
    logged and, when it may stop early, for a checkpoint. When the loss arrives (on_log, every
    process), the first process generates and scores; the others wait for its result, and every
    process records it in the Trainer's log_history (saved with each checkpoint, so a resumed
    run remembers its curve) and sets the same best step and the same stop decision. The best
    step goes to the Trainer's own best_global_step, which keeps that checkpoint from rotation.
    """

    def __init__(self, spec_path: str, progress: ProgressFile | None = None) -> None:
        self.spec = valcurve.read_spec(spec_path)
        self.curve_path = valcurve.curve_path(Path(spec_path).parent)
        self.progress = progress
        self.evaluations: list[dict[str, Any]] = []
        self.ended_at: int | None = None

    @property
    def stops_early(self) -> bool:
        return self.spec.get("patience") is not None

    def _due(self, state: Any) -> bool:
        step = state.global_step
        return step > 0 and (step % self.spec["every"] == 0 or step >= state.max_steps)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A resumed run: its evaluations so far came back with the checkpoint's log_history.
        self.evaluations = [entry[valcurve.LOG_KEY] for entry in state.log_history
                            if isinstance(entry.get(valcurve.LOG_KEY), dict)]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._due(state):
            control.should_log = True  # this step's loss comes with its evaluation
            if self.stops_early:
                control.should_save = True  # any evaluated step may be the one merged
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               model: Any = None, processing_class: Any = None, **kwargs: Any) -> Any:
        if not logs or "loss" not in logs or not self._due(state):
            return control
        if self.evaluations and self.evaluations[-1]["step"] >= state.global_step:
            return control
        result = None
        if state.is_world_process_zero:
            result = self._evaluate(state, logs, model, processing_class)
        result = _broadcast(result)
        self.evaluations.append(result["record"])
        state.log_history.append({valcurve.LOG_KEY: result["record"], "step": state.global_step})
        if self.stops_early:
            state.best_global_step = result["best_step"]
            if result["stop"]:
                control.should_training_stop = True
        if state.is_world_process_zero:
            if self.progress is not None:
                self.progress.write(state, "eval", {**result["record"], **{
                    k: result[k] for k in ("best_step", "best_score", "since_best", "stop")}})
            self._write_curve(state)
        return control

    def _evaluate(self, state: Any, logs: dict[str, Any], model: Any,
                  tokenizer: Any) -> dict[str, Any]:
        start = time.time()
        answers = greedy_answers(model, tokenizer, self.spec["prompts"], self.spec["max_tokens"])
        scores = valcurve.score_answers(self.spec, answers)
        loss = logs.get("loss")
        record = {"step": state.global_step, "score": sum(scores) / max(1, len(scores)),
                  "loss": loss if isinstance(loss, float) and math.isfinite(loss) else None,
                  "epoch": state.epoch, "seconds": round(time.time() - start, 2)}
        decision = valcurve.plateau([*self.evaluations, record], self.spec.get("patience"),
                                    self.spec.get("min_delta") or 0.0)
        return {"record": record, **decision}

    def _write_curve(self, state: Any) -> None:
        decision = valcurve.plateau(self.evaluations, self.spec.get("patience"),
                                    self.spec.get("min_delta") or 0.0)
        valcurve.write_spec(self.curve_path, {
            "metric": self.spec["metric"], "rows": len(self.spec["examples"]),
            "every": self.spec["every"], "patience": self.spec.get("patience"),
            "min_delta": self.spec.get("min_delta"), "max_steps": state.max_steps,
            "evaluations": self.evaluations, "best_step": decision["best_step"],
            "best_score": decision["best_score"],
            "stopped_early": bool(decision["stop"]) and self.ended_at is not None
            and self.ended_at < state.max_steps,
            "ended_at": self.ended_at})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ended_at = state.global_step
        if state.is_world_process_zero:
            self._write_curve(state)


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
        progress = ProgressFile(path) if path else None
        callbacks: list[Any] = [progress] if progress else []
        spec = os.environ.get(valcurve.VAL_EVAL_ENV)
        if spec:
            callbacks.append(ValEvaluation(spec, progress))
        return callbacks
