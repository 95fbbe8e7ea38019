"""The training backend's artifacts: what counts as a finished adapter (copa.backends.axolotl)."""

from __future__ import annotations

from pathlib import Path

from copa.backends import get_backend


def test_a_training_killed_early_has_no_adapter_to_merge(tmp_path: Path) -> None:
    has_adapter = get_backend().has_adapter
    # Axolotl writes adapter_config.json before the first step; a training OOM-killed at step 5
    # leaves it behind, and a shared study model was once merged from such a folder.
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not has_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    assert has_adapter(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    assert not has_adapter(tmp_path)
