"""The train stage: the rendered Axolotl config and rows -> a LoRA adapter (through the backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from copa.runs import Run


def train_stage(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend
    from copa.data import read_jsonl
    from copa.stages.render import steps_for

    rows = len(read_jsonl(run.rendered / "train.jsonl"))
    adapter = get_backend().train(run.recipe, run.rendered / "axolotl.yml", run.train_dir,
                                  emit=run.emit, total_steps=steps_for(run.recipe, rows))
    return {"adapter": str(adapter), "log": str(run.train_dir / "axolotl-train.log")}
