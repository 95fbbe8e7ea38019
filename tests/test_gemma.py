"""The second embedded model, Gemma 3 270M: a base model whose GGUF carries no chat template and
whose tokenizer adds no <bos> (without it the model answers "is is is ..."). copa writes
Gemma's turn markers into the converted tokenizer with the <bos> first, so every path that
formats a chat through the tokenizer (Axolotl's training rows, copa's engine, the servers) sends
exactly one <bos> and whole turn markers.

A tiny random model of Gemma 3's shape stands in for the 270M one; the tokenizer is the real one,
read from the GGUF that `make install` ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_recipe

from copa.inference.local import LocalModel
from copa.model_checks import check_model
from copa.models import (
    EMBEDDED,
    GEMMA3_ALIAS,
    chat_template_text,
    fix_chat_tokens,
    gemma3_gguf_path,
    model_type,
    save_tokenizer,
)

CHAT = [{"role": "system", "content": "Name the iris species."},
        {"role": "user", "content": "petal_length: 1.4"},
        {"role": "assistant", "content": "setosa"},
        {"role": "user", "content": "petal_length: 5.1"}]


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Gemma3ForCausalLM (random weights, init std 0.3 so prompts get different
    answers) with the real Gemma 3 tokenizer, converted as copa converts the 270M model."""
    import torch
    import transformers

    gguf = gemma3_gguf_path()
    template = chat_template_text(EMBEDDED[GEMMA3_ALIAS].chat_template)
    tokenizer = fix_chat_tokens(transformers.AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name), template)
    config = transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer),
        max_position_embeddings=1024, sliding_window=64, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gemma")
    transformers.Gemma3ForCausalLM(config).save_pretrained(out)
    save_tokenizer(tokenizer, out)  # as the conversion of the 270M model saves it
    return out


def test_gemma_alias_is_an_embedded_model_with_its_own_architecture() -> None:
    assert check_model(GEMMA3_ALIAS) is None
    assert model_type(GEMMA3_ALIAS) == "gemma3_text"
    assert gemma3_gguf_path().stat().st_size > 200_000_000  # assembled whole


def test_the_saved_gemma_tokenizer_tokenizes_as_the_gguf_does(tiny_gemma_dir: Path) -> None:
    """Reloaded from the folder, words keep the GGUF's tokens (Gemma's own tokenizer class
    rebuilt a character-per-token BPE from the saved vocabulary: 'virginica' in 9 tokens)."""
    import transformers

    gguf = gemma3_gguf_path()
    original = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    saved = LocalModel(str(tiny_gemma_dir)).tokenizer
    for text in ("virginica", "Name the iris species.\npetal_length: 5.1"):
        want = original(text, add_special_tokens=False)["input_ids"]
        assert saved(text, add_special_tokens=False)["input_ids"] == want
    assert len(saved("virginica", add_special_tokens=False)["input_ids"]) < 9


def test_every_gemma_prompt_starts_with_one_bos_and_whole_turn_markers(
        tiny_gemma_dir: Path) -> None:
    model = LocalModel(str(tiny_gemma_dir))
    tokenizer = model.tokenizer
    bos, start, end = (tokenizer.convert_tokens_to_ids(t)
                       for t in ("<bos>", "<start_of_turn>", "<end_of_turn>"))
    assert tokenizer.eos_token == "<end_of_turn>"  # what training teaches and decoding stops at
    for chat in (CHAT, CHAT[1:2], CHAT[:2]):
        prefix, rest = model.split_prompt(chat)
        ids = [*prefix, *rest]
        assert ids[0] == bos and ids.count(bos) == 1, chat
        # each turn opens and closes with its one marker token, never spelled out in pieces
        users = sum(m["role"] != "system" for m in chat)
        assert ids.count(start) == users + 1 and ids.count(end) == users
        assert model.render(chat).endswith("<start_of_turn>model\n")
    assert end in model._end_ids()


def test_gemma_batched_greedy_answers_equal_one_at_a_time(tiny_gemma_dir: Path) -> None:
    model = LocalModel(str(tiny_gemma_dir))
    chats = [[*CHAT[:1], {"role": "user", "content": f"petal_length: {i}.{i * 7 % 10}" * (i + 1)}]
             for i in range(6)]
    max_new = [4 + i for i in range(6)]
    alone = [model.generate_detailed([c], [m], [None])[0] for c, m in zip(chats, max_new)]
    batched = model.generate_detailed(chats, max_new, [None] * 6)
    assert batched == alone
    assert len({g.text for g in batched}) > 1  # the prompts really get different answers


@pytest.mark.slow
def test_gemma_training_rows_start_with_one_bos(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """Real Axolotl tokenizes copa's rendered rows for a Gemma-shaped model: each row opens with
    one <bos>, and the trained tokens are the answer and its <end_of_turn>, nothing else."""
    import datasets
    import transformers

    from copa import pipeline

    recipe = write_tiny_recipe(tmp_path, tiny_gemma_dir, max_steps=1)
    # Gemma's tokenizer spends a token per digit: an Iris row is ~180 tokens, not SmolLM2's ~90
    recipe.write_text(recipe.read_text().replace("sequence_len: 128", "sequence_len: 256"))
    pipeline.run(recipe, run_dir=tmp_path / "run", stages=("render", "train"),
                 emit=lambda _: None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gemma_dir)
    bos, end = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prepared = [p.parent for p in (tmp_path / "run").rglob("prepared/**/dataset_info.json")]
    assert prepared, "Axolotl left no prepared dataset"
    rows = datasets.load_from_disk(str(prepared[0]))
    answers = {json.loads(line)["messages"][-1]["content"]
               for line in (tmp_path / "run" / "rendered" / "train.jsonl").open()}
    assert len(rows) >= 4
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        assert ids[0] == bos and ids.count(bos) == 1
        trained = [t for t in labels if t != -100]
        assert trained[-1] == end
        assert tokenizer.decode(trained[:-1]).strip() in answers


def test_gemma_packed_decoding_answers_as_transformers_generate_does(
        tiny_gemma_dir: Path) -> None:
    """Gemma 3's local layers see only their last `sliding_window` keys: copa's packed decoding
    applies that window as transformers' own generate() does, on prompts longer than it."""
    model = LocalModel(str(tiny_gemma_dir))
    assert model.packed and model.batch_invariant
    window = model.model.config.sliding_window
    chats = [[{"role": "user", "content": "petal " * (i * 30)}] for i in range(1, 4)]
    assert max(len(model.split_prompt(c)[1]) for c in chats) > window
    ours = model.generate_detailed(chats, [8] * 3, [None] * 3)
    model.packed = False  # the fallback: model.generate with the model's own masks
    try:
        theirs = [model.generate_detailed([c], [8], [None])[0] for c in chats]
    finally:
        model.packed = True
    assert ours == theirs
