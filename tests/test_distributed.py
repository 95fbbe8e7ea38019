"""Scale-out for real: `finetune.distributed: {processes: 2}` trains one LoRA adapter with two
data-parallel processes on CPU (torchrun, gloo) through Axolotl, and the result merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_recipe

from copa import pipeline

pytestmark = pytest.mark.slow


def test_two_processes_train_one_adapter_together(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_tiny_recipe(tmp_path, tiny_model_dir, max_steps=2)
    text = recipe.read_text().replace(
        "  sequence_len: 128\n",
        "  sequence_len: 128\n  distributed: {processes: 2, launcher: torchrun}\n")
    recipe.write_text(text)
    messages: list[str] = []
    run = pipeline.run(recipe, stages=["merge"], run_dir=tmp_path / "run", emit=messages.append)

    events = [json.loads(line) for line in
              (run.train_dir / "progress.jsonl").read_text().splitlines()]
    # One process group of two (torch.distributed's own count), and only rank 0 reports.
    begins = [e for e in events if e["event"] == "begin"]
    assert len(begins) == 1 and begins[0]["world_size"] == 2
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    # The 12 training rows are sharded: a step takes 4 rows on each of 2 processes, so an epoch
    # is 2 steps (one process alone would need 3).
    assert steps[0]["epoch"] == pytest.approx(0.5)
    assert len([m for m in messages if m.startswith("  step ")]) == 2  # not once per process
    adapter = Path(run.manifest.stage("train")["artifacts"]["adapter"])
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (run.merged / "config.json").is_file()
