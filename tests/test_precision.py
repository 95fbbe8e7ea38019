"""finetune.precision and serve.precision: what auto means where, what each renders and loads,
and that a bf16 engine keeps copa's promise (batched answers == one-at-a-time answers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_varied_llama

from copa import precision
from copa.backends import Hardware
from copa.backends.axolotl_config import render_config
from copa.inference.cache import cache_tag
from copa.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent
IRIS = REPO / "recipes" / "iris.yaml"
ZEN5 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
ZEN3 = {"avx2", "fma"}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert precision.cpu_flags(tmp_path / "missing") == set()
    assert precision.native_bf16_cpu({"amx_bf16"}) and precision.native_bf16_cpu(ZEN5)
    assert not precision.native_bf16_cpu(ZEN3)


def test_explicit_precision_is_kept_and_auto_is_bf16_on_a_gpu_only() -> None:
    assert precision.resolve("bf16", cuda=False, flags=ZEN3) == "bf16"
    assert precision.resolve("fp32", cuda=True) == "fp32"
    assert precision.resolve("auto", cuda=True) == "bf16"
    # auto on a CPU stays fp32 even with native bf16, while BF16_ON_NATIVE_CPU is off (measured)
    assert precision.resolve("auto", cuda=False, flags=ZEN5) == "fp32"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision.resolve("fp16", cuda=False)


def test_auto_on_a_cpu_follows_native_bf16_when_switched_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "BF16_ON_NATIVE_CPU", True)
    assert precision.resolve("auto", cuda=False, flags=ZEN5) == "bf16"
    assert precision.resolve("auto", cuda=False, flags=ZEN3) == "fp32"


def test_training_precision_renders_axolotl_bf16(tmp_path: Path) -> None:
    def rendered(value: str | None, cuda: bool) -> object:
        overrides = {"finetune.precision": value} if value else {}
        recipe = load_recipe(IRIS, overrides=overrides)
        config = render_config(recipe, "/m", tmp_path / "t.jsonl", tmp_path, Hardware(cuda=cuda))
        return config["bf16"]

    assert rendered(None, cuda=False) is False       # auto on this CPU: fp32
    assert rendered("bf16", cuda=False) is True      # the plugin adds use_cpu for the Trainer
    assert rendered(None, cuda=True) == "auto"       # Axolotl decides per GPU
    assert rendered("fp32", cuda=True) is False
    assert rendered("bf16", cuda=True) is True


def test_serve_precision_is_for_the_local_engine_only() -> None:
    with pytest.raises(RecipeError, match="serve.precision"):
        load_recipe(IRIS, overrides={"serve.engine": "vllm", "serve.precision": "bf16"})
    assert load_recipe(IRIS, overrides={"serve.precision": "bf16"}).serve.precision == "bf16"


def test_bf16_answers_never_share_cached_fp32_answers() -> None:
    digest = "ab" * 32
    assert cache_tag(digest, "bf16") not in (None, cache_tag(digest, "fp32"))
    assert cache_tag(None, "bf16") is None
    assert precision.key_part("fp32") == []
    assert precision.key_part("bf16") == ["precision=bf16"]


def test_bf16_engine_batched_answers_equal_one_at_a_time(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from copa.inference.local import LocalModel

    model = LocalModel(str(save_varied_llama(tiny_model_dir, tmp_path / "varied", seed=0)),
                       precision="bf16")
    assert model.precision == "bf16"
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    assert model.batch_invariant  # the row-independence probe ran on bf16 products
    chats = [[{"role": "user", "content": f"Tell me about {w}."}]
             for w in ("cats", "the sea", "numbers", "iris flowers", "rain", "a b c")]
    max_new = [4 + 3 * i for i in range(len(chats))]
    alone = [model.generate_detailed([c], [m], [None])[0] for c, m in zip(chats, max_new)]
    batched = model.generate_detailed(chats, max_new, [None] * len(chats))
    assert batched == alone
    assert len({g.text for g in batched}) > 1
