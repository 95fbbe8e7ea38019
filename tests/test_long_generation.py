"""Long answers (a chain of thought: hundreds of tokens) through the batched engine, each request
with its own max tokens and stop strings: bitwise what each gets when generated alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import save_varied_llama

from copa.inference.engine import BatchingEngine
from copa.inference.local import LocalModel

# Long for a tiny model on 2 shared cores (each step is a 49k-vocabulary product).
LONG = [130, 100, 120, 110]
pytestmark = pytest.mark.slow  # ~700 decode steps: minutes on 2 shared cores


@pytest.fixture(scope="module")
def varied(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalModel:
    """The tiny Llama with larger random weights, so every prompt gets its own long text."""
    return LocalModel(str(save_varied_llama(tiny_model_dir, tmp_path_factory.mktemp("varied-long"),
                                            seed=1)))


def chat(i: int) -> list[dict[str, str]]:
    demo = [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"},
            {"role": "assistant", "content": "reasoning: 3 + 4 = 7.\nanswer: 7"}]
    question = {"role": "user", "content": f"Problem {i}: {i} boxes of {i + 2} pens. How many?"}
    return [{"role": "system", "content": "Solve step by step."}, *demo, question]


def test_long_answers_with_stop_strings_batch_exactly_as_alone(varied: LocalModel) -> None:
    prompts = [chat(i) for i in range(len(LONG))]
    unstopped = [varied.generate_detailed([p], [m], [None])[0]
                 for p, m in zip(prompts, LONG, strict=True)]
    assert all(g.output_tokens == m for g, m in zip(unstopped, LONG, strict=True))
    # Odd rows stop at a string their own answer reaches after ~50 tokens; even rows run long.
    stops: list[list[str] | None] = []
    for i, gen in enumerate(unstopped):
        if i % 2:
            cut = len(varied.tokenizer.decode(
                varied.tokenizer(gen.text, add_special_tokens=False)["input_ids"][:50]))
            stops.append([gen.text[cut:cut + 6]])
        else:
            stops.append(None)

    alone = [varied.generate_detailed([p], [m], [s])[0] if s else full
             for p, m, s, full in zip(prompts, LONG, stops, unstopped, strict=True)]
    engine = BatchingEngine(varied, max_batch_size=8, batch_wait_ms=200)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(lambda a: engine.submit(*a).result(), args)
                       for args in zip(prompts, LONG, stops, strict=True)]
            batched = [f.result() for f in futures]
    finally:
        engine.close()
    assert max(engine.batch_sizes) > 1  # the requests really shared a batch
    assert batched == alone  # texts, token counts and finish reasons
    assert engine.generated_tokens == sum(g.output_tokens for g in batched)
    for i, (gen, full) in enumerate(zip(batched, unstopped, strict=True)):
        if stops[i]:
            assert gen.finish_reason == "stop" and 40 <= gen.output_tokens < LONG[i]
            assert full.text.startswith(gen.text) and stops[i][0] not in gen.text
        else:
            assert gen.finish_reason == "length" and gen.output_tokens == LONG[i]
