"""`model.trust_remote_code` reaches every load: the local engine's tokenizer and model, the
servers' command lines and the Axolotl config (which Axolotl's train and merge both read).

The remote-code model here is real and local: the tiny Llama folder with a config.json whose
`auto_map` names classes in a `custom.py` beside it and whose model_type transformers does not
know, so it loads only with trust_remote_code=True (as a hub model with its own code would).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from copa.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent

CUSTOM_CODE = '''\
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteTinyConfig(LlamaConfig):
    model_type = "copa-remote-tiny"


class RemoteTinyForCausalLM(LlamaForCausalLM):
    config_class = RemoteTinyConfig
'''


@pytest.fixture(scope="module")
def remote_code_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "custom.py").write_text(CUSTOM_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "copa-remote-tiny"
    config["architectures"] = ["RemoteTinyForCausalLM"]
    config["auto_map"] = {"AutoConfig": "custom.RemoteTinyConfig",
                          "AutoModelForCausalLM": "custom.RemoteTinyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _recipe(trust: bool):
    return load_recipe(REPO / "recipes" / "iris.yaml",
                       overrides={"model.trust_remote_code": trust})


def test_the_local_engine_loads_a_remote_code_model_only_when_the_recipe_trusts_it(
        remote_code_model: Path) -> None:
    from copa.dspy.lms import model_lm
    from copa.inference.engine import close_all

    try:
        with pytest.raises(ValueError, match="trust_remote_code"), \
                model_lm(_recipe(False), str(remote_code_model), "remote"):
            pass
        with model_lm(_recipe(True), str(remote_code_model), "remote") as lm:
            local = lm.engine
            assert type(local.model.model).__name__ == "RemoteTinyForCausalLM"
            assert local.model.trust_remote_code is True
            assert local.dump_state()["trust_remote_code"] is True
            assert local.model.generate([[{"role": "user", "content": "hi"}]], [2], [None])
    finally:
        close_all()


def test_the_axolotl_config_carries_it(tmp_path: Path) -> None:
    from copa.backends import Hardware
    from copa.backends.axolotl_config import render_config

    for trust in (True, False):
        config = render_config(_recipe(trust), "/m", tmp_path / "t.jsonl", tmp_path,
                               Hardware(cuda=False))
        assert config["trust_remote_code"] is trust


def test_server_commands_carry_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from copa.inference import servers

    monkeypatch.setattr(servers, "_executable", lambda name: name)
    for engine in ("vllm", "transformers"):
        trusted = servers.server_command(engine, "/m", 8123, name="m", trust_remote_code=True)
        assert trusted[-1] == "--trust-remote-code"
        assert "--trust-remote-code" not in servers.server_command(engine, "/m", 8123, name="m")


def test_transformers_serve_knows_the_flag() -> None:
    """The spelling is the installed `transformers serve`'s own (vLLM spells it the same)."""
    beside = Path(sys.executable).parent / "transformers"
    exe = str(beside) if beside.is_file() else shutil.which("transformers")
    if exe is None:
        pytest.skip("transformers CLI not installed")
    out = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    assert "--trust-remote-code" in out.stdout
