"""Shared fixtures: a tiny real (random) Llama with SmolLM2's tokenizer and chat template, and a
small recipe around it. Real parts everywhere: real transformers, Axolotl and DSPy, just small."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Batch-invariant MKL GEMM (see copa/lm.py): MKL reads this once, before any test does torch
# math, so it is set here rather than left to whichever test imports copa.inference.engine first.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

REPO = Path(__file__).resolve().parent.parent
# Synthetic stand-ins for Banking77 / GSM8K / SQuAD (tests/fixtures/README.md): the shipped
# recipes read their data under $COPA_DATA, set here for every test, so no test reads the real
# data sets.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
os.environ["COPA_DATA"] = str(FIXTURE_DATA)
# MLflow tracking is on by default (copa.track); its import and a new sqlite store cost seconds
# per run, so tests run untracked, except tests/test_track.py, which turns it on explicitly.
os.environ["COPA_TRACK"] = "off"
# Split sizes the fixtures can hold, for recipes whose own sizes need the full data sets.
FIXTURE_SPLITS = {"banking77": {"train": 40, "val": 20, "test": 30, "seed": 0},
                  "gsm8k": {"train": 12, "val": 4, "test": 8, "seed": 0},
                  "squad": {"train": 8, "val": 4, "test": 6, "seed": 0},
                  "squad_rag": {"train": 8, "val": 4, "test": 6, "seed": 0}}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with random weights and the SmolLM2 tokenizer (~3 M params)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_llama(out: Path) -> Path:
    """The tiny_model_dir fixture's model, saved to out (also for scripts outside pytest)."""
    import torch
    import transformers

    from copa.models import fix_chat_tokens, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = fix_chat_tokens(
        transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out



def write_stub_model(folder: Path) -> Path:
    """A model folder as the checks before any model loads see it: config.json and a whole
    model.safetensors (one tensor of four zeros). It never loads as a model."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header +
                                               bytes(16))
    return folder


def save_varied_llama(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """The tiny Llama re-drawn with larger random weights (init std 0.3, not 0.02), saved to out.

    At std 0.02 the tiny model answers every prompt with the same newlines, which would let a
    batching bug (wrong mask, rows mixed up) pass unseen; at 0.3 each prompt gets its own text.
    """
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out

TINY_RECIPE = """\
name: tiny
model:
  base: {model}
task:
  signature: "sepal_length, sepal_width, petal_length, petal_width -> species"
  instructions: "Name the iris species."
  choices: [setosa, versicolor, virginica]
data:
  source: sklearn:iris
  splits: {{train: 12, val: 6, test: 9, seed: 0}}
prompt:
  number_format: ".1f"
finetune:
  max_steps: {max_steps}
  save_steps: {save_steps}
  micro_batch_size: 4
  learning_rate: 1.0e-3
  sequence_len: 128
optimize:
  optimizer: BootstrapFewShotWithRandomSearch
  params: {{max_bootstrapped_demos: 1, max_labeled_demos: 2, num_candidate_programs: 1}}
  num_threads: 4
evaluate:
  metric: label_accuracy
  max_tokens: 4
  bootstrap: 200
  num_threads: 4
"""


def write_tiny_recipe(folder: Path, model: Path, max_steps: int = 3, save_steps: int = 25,
                      extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(model=model, max_steps=max_steps,
                                       save_steps=save_steps) + extra)
    return path


TINY_OPTIMIZE = ("  optimizer: BootstrapFewShotWithRandomSearch\n"
                 "  params: {max_bootstrapped_demos: 1, max_labeled_demos: 2, "
                 "num_candidate_programs: 1}\n")


def write_prompt_only_recipe(folder: Path, model: Path, optimize: str) -> Path:
    """The tiny recipe without fine-tuning, its optimize lines (optimizer, params, ...)
    replaced by `optimize`: for runs of the prompt stage alone."""
    path = write_tiny_recipe(folder, model)
    text = path.read_text().replace("finetune:\n", "finetune:\n  enabled: false\n", 1)
    assert TINY_OPTIMIZE in text
    path.write_text(text.replace(TINY_OPTIMIZE, optimize))
    return path


class LabelModel:
    """A stand-in model for copa's engine that answers a label task in ChatAdapter's format:
    a subclass says which label a chat gets (`label`), with no weights to load."""

    path = "label-model"

    def label(self, chat: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def generate_detailed(self, prompts, max_new_tokens, stop, sampling=None) -> list[Any]:
        from copa.inference.local import Generation

        return [Generation(f"[[ ## label ## ]]\n{self.label(chat)}\n\n[[ ## completed ## ]]",
                           1, 1, "stop") for chat in prompts]


@contextmanager
def engine_lm(model: Any, name: str, max_batch_size: int = 4) -> Iterator[Any]:
    """A dspy.LM on copa's real batching engine over a stand-in model (a class with
    generate_detailed), for tests of what DSPy and copa do with its answers."""
    import dspy

    from copa.inference.engine import BatchingEngine

    engine = BatchingEngine(model, max_batch_size=max_batch_size, batch_wait_ms=0)
    try:
        yield dspy.LM(f"local/{name}", engine=engine, cache=False, num_retries=0, max_tokens=16)
    finally:
        engine.close()


def label_examples(texts: list[str]) -> list[Any]:
    """text -> label examples: 'pos' where the text says good, else 'neg'."""
    import dspy

    return [dspy.Example(text=t, label="pos" if "good" in t else "neg").with_inputs("text")
            for t in texts]


def label_exact(example: Any, prediction: Any, trace: Any = None) -> float:
    return float(example.label == prediction.label)
