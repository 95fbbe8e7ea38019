"""The train stage: the rendered Axolotl config and rows -> a LoRA adapter (through the backend).
With finetune.eval the training process also scores val as it trains (copa.backends.valcurve);
with finetune.early_stopping the adapter is the best checkpoint's, and the manifest says which."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from copa.runs import Run


def val_eval_spec(run: Run) -> Path | None:
    """Write what the training process scores val with (finetune.eval), or None without it:
    the rendered val rows' prompts (val rows only: the test split is never read here)."""
    from copa.backends import valcurve
    from copa.data import read_jsonl

    if run.recipe.finetune.eval is None:
        return None
    spec = valcurve.eval_spec(run.recipe, run.checked.spec.output_fields,
                              read_jsonl(run.rendered / "val.jsonl"),
                              read_jsonl(run.rendered / "splits" / "val.jsonl"))
    return valcurve.write_spec(run.train_dir / valcurve.SPEC_NAME, spec)


def train_stage(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend, valcurve
    from copa.data import read_jsonl
    from copa.runs import TRAIN_CONFIG, TRAIN_ROWS

    backend = get_backend()
    rows = len(read_jsonl(run.rendered / TRAIN_ROWS))
    adapter = backend.train(run.recipe, run.rendered / TRAIN_CONFIG, run.train_dir,
                            emit=run.emit, total_steps=backend.steps_for(run.recipe, rows),
                            val_eval=val_eval_spec(run))
    artifacts: dict[str, Any] = {"adapter": str(adapter),
                                 "log": str(run.train_dir / "axolotl-train.log")}
    curve = valcurve.read_curve(run.train_dir) if run.recipe.finetune.eval else None
    if curve is not None:
        artifacts.update({"val_curve": str(valcurve.curve_path(run.train_dir)),
                          "best_step": curve["best_step"], "ended_at": curve["ended_at"],
                          "stopped_early": curve["stopped_early"]})
        run.emit("  " + valcurve.curve_text(curve))
    return artifacts
