"""The plain_finetune stage: when the recipe's fine-tune saw demos in its rows, the same
fine-tune without them (rendered/plain/), trained and merged into plain/merged. It is the
fine-tune-only arm's model, so that arm is a fair weights-only arm: a model prompted as it
was trained."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from copa.runs import Run


def plain_finetune_stage(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend
    from copa.data import read_jsonl
    from copa.runs import TRAIN_CONFIG, TRAIN_ROWS

    config = run.rendered_plain / TRAIN_CONFIG
    rows = len(read_jsonl(run.rendered_plain / TRAIN_ROWS))
    work = run.plain_dir / "train"
    backend = get_backend()
    run.emit("  the demo-free fine-tune (the fine-tune-only arm's model)")
    adapter = backend.train(run.recipe, config, work, emit=run.emit,
                            total_steps=backend.steps_for(run.recipe, rows))
    backend.merge(config, adapter, run.plain_merged, work)
    return {"adapter": str(adapter), "model": str(run.plain_merged),
            "log": str(work / "axolotl-train.log")}
