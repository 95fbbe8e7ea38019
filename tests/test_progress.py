"""Training progress comes from a TrainerCallback in the training process (the plugin copa names
in every Axolotl config), not from log lines: every logging step arrives, a nan loss included."""

from __future__ import annotations

import math
from pathlib import Path


def test_each_logged_step_reaches_the_display_and_a_nan_loss_is_shown(tmp_path: Path) -> None:
    import transformers

    from copa.backends.axolotl_plugin import ProgressFile
    from copa.backends.progress import TrainingProgress

    path = tmp_path / "progress.jsonl"
    lines: list[str] = []
    callback = ProgressFile(str(path))
    state = transformers.TrainerState(max_steps=3)
    with TrainingProgress(path, lines.append, total_steps=3, live=False) as progress:
        callback.on_train_begin(None, state, None)
        for step, loss in [(1, 1.5), (2, math.nan), (3, 0.25)]:
            state.global_step, state.epoch = step, step / 3
            callback.on_log(None, state, None, logs={"loss": loss, "learning_rate": 1e-3})
        callback.on_log(None, state, None, logs={"train_runtime": 1.0})  # not a step
        callback.on_train_end(None, state, None)
    assert [e["event"] for e in progress.events] == ["begin", "step", "step", "step", "end"]
    assert len(lines) == 3
    assert lines[0].startswith("  step 1/3  loss 1.5000  lr 1.00e-03")
    assert lines[1].startswith("  step 2/3  loss nan")
    assert lines[2].startswith("  step 3/3  loss 0.2500")


def test_a_worker_process_other_than_the_first_writes_nothing(tmp_path: Path) -> None:
    import transformers

    from copa.backends.axolotl_plugin import ProgressFile

    path = tmp_path / "progress.jsonl"
    state = transformers.TrainerState(max_steps=3, global_step=1, is_world_process_zero=False)
    ProgressFile(str(path)).on_log(None, state, None, logs={"loss": 1.0})
    assert not path.exists()
