"""Scale-out for real: `finetune.distributed: {processes: 2}` trains one LoRA adapter with two
data-parallel processes on CPU (torchrun, gloo) through Axolotl, and the result merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_early_stopping import scripted_recipe

from copa import pipeline
from copa.data import read_jsonl

pytestmark = pytest.mark.slow


def test_two_processes_train_one_adapter_together(tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Also early stopping across processes: the first process scores val (the scripted
    metric: 0.5, 0.5 -> no gain at step 2, patience 1), and both stop at step 2 of at most 6. A
    process that went on alone would wait for its partner's gradients until ddp_timeout."""
    recipe = scripted_recipe(tmp_path, tiny_model_dir, max_steps=6, finetune=(
        "finetune:\n  eval: {every: 1}\n  early_stopping: {patience: 1}\n"
        "  distributed: {processes: 2, launcher: torchrun}\n  axolotl: {ddp_timeout: 60}\n"))
    monkeypatch.setenv("SCRIPTED_METRIC_LOG", str(tmp_path / "metric.jsonl"))
    monkeypatch.setenv("SCRIPTED_SCORES", "[0.5, 0.5, 0.9]")
    messages: list[str] = []
    run = pipeline.run(recipe, stages=["merge"], run_dir=tmp_path / "run", emit=messages.append)

    events = [json.loads(line) for line in
              (run.train_dir / "progress.jsonl").read_text().splitlines()]
    # One process group of two (torch.distributed's own count), and only rank 0 reports.
    begins = [e for e in events if e["event"] == "begin"]
    assert len(begins) == 1 and begins[0]["world_size"] == 2
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]  # stopped early: the ceiling was 6
    evals = [e for e in events if e["event"] == "eval"]
    assert [(e["step"], e["stop"]) for e in evals] == [(1, False), (2, True)]
    calls = read_jsonl(tmp_path / "metric.jsonl")
    assert len(calls) == 2 * 6 and len({c["pid"] for c in calls}) == 1  # one process scored
    assert Path(run.manifest.stage("train")["artifacts"]["adapter"]).name == "checkpoint-1"
    # The 12 training rows are sharded: a step takes 4 rows on each of 2 processes, so an epoch
    # is 2 steps (one process alone would need 3).
    assert steps[0]["epoch"] == pytest.approx(0.5)
    assert len([m for m in messages if m.startswith("  step ")]) == 2  # not once per process
    adapter = Path(run.manifest.stage("train")["artifacts"]["adapter"])
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (run.merged / "config.json").is_file()
