"""Fine-tuning with demos in every training row (`finetune.demos: fixed`, `optimize.order: p->w`),
on the tiny model: the rows carry the demos, and the report never prints a synergy (or "beats")
against a fine-tune-only arm that is prompted without the demos it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_tiny_recipe

from copa import pipeline
from copa.data import read_jsonl

pytestmark = pytest.mark.slow

# Rows with two demos are ~3x longer than the tiny recipe's sequence_len of 128 allows.
SETTINGS: dict[str, dict[str, Any]] = {
    "finetune.demos: fixed": {"finetune.demos": "fixed", "finetune.num_demos": 2,
                              "finetune.sequence_len": 512},
    # Labeled demos only: always 2 (a random tiny model passes no bootstrap).
    "optimize.order: p->w": {"optimize.order": "p->w", "optimize.optimizer": "BootstrapFewShot",
                             "optimize.params": {"max_bootstrapped_demos": 0,
                                                 "max_labeled_demos": 2},
                             "finetune.sequence_len": 512},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_demo_trained_rows_and_no_unfair_synergy(setting: str, tmp_path: Path,
                                                 tiny_model_dir: Path) -> None:
    recipe = write_tiny_recipe(tmp_path, tiny_model_dir)
    messages: list[str] = []
    run = pipeline.run(recipe, run_dir=tmp_path / "run", emit=messages.append,
                       overrides=SETTINGS[setting])
    demos = json.loads((run.rendered / "demos.json").read_text())
    assert len(demos) == 2
    train_split = read_jsonl(run.rendered / "splits" / "train.jsonl")
    assert all(d in train_split for d in demos)  # demos are train rows, never test rows
    rows = read_jsonl(run.rendered / "train.jsonl")
    assert len(rows) == len(train_split) - 2
    for row in rows:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert answers[:2] == [d["species"] for d in demos] and len(answers) == 3
    if setting.startswith("optimize.order"):
        assert "  p -> w: optimizing prompts on the base model first" in messages
        # The demo set is the base-model optimizer's own pick (even where the val guard kept
        # the plain program for the prompt-only arm).
        first = json.loads((run.optimize_dir / "prompt_first.json").read_text())
        assert first["optimized_demos"] == len(demos)
    report = json.loads((run.dir / "report.json").read_text())
    synergy = report["synergy"]
    assert synergy["comparable"] is False and synergy["value"] is None
    assert setting in synergy["reason"]
    text = (run.dir / "report.md").read_text()
    assert f"not comparable: {synergy['reason']}" in text
    assert "beats" not in text
