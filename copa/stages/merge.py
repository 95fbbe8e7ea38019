"""The merge stage: the trained adapter merged into the base model -> a standalone model folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from copa.runs import Run


def merge_stage(run: Run) -> dict[str, Any]:
    from copa.backends import get_backend
    from copa.runs import TRAIN_CONFIG

    adapter = Path(run.manifest.stage("train")["artifacts"]["adapter"])
    get_backend().merge(run.rendered / TRAIN_CONFIG, adapter, run.merged, run.train_dir)
    return {"model": str(run.merged)}
