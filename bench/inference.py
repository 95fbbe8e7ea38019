"""Examples/s of DSPy-driven greedy generation: one request at a time vs. copa's batching engine.

N chat prompts are sent through `dspy.LM` from T threads (as dspy.Evaluate does), first to an
engine with max_batch_size=1, then to the batching engine; both share one loaded model. The two
runs must give identical answers (greedy, batch-invariant). Results: bench/results/inference.json.

    python bench/inference.py [--model DIR] [--n 64] [--threads 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

SYSTEM = "Answer in one short sentence."
SUBJECTS = ["the moon", "a volcano", "bread", "a bicycle", "the ocean", "a library", "rain",
            "a violin", "the desert", "a forest", "electricity", "a glacier", "coffee",
            "a lighthouse", "the internet", "honey"]
FORMS = ["What is {}?", "Why does {} matter to people?", "Describe {} to a child.",
         "Name one fact about {}."]


def prompts(n: int) -> list[tuple[str, str]]:
    """n (system, user) pairs of varied length; deterministic, no dataset needed."""
    out = []
    for i in range(n):
        user = FORMS[i % len(FORMS)].format(SUBJECTS[(i // len(FORMS) + i) % len(SUBJECTS)])
        out.append((SYSTEM, user if i % 3 else user + " Please keep it simple and clear."))
    return out


def run(lm: Any, items: list[tuple[str, str]], threads: int) -> tuple[float, list[str], int]:
    from dspy.lm15 import Message, Request

    def call(item: tuple[str, str]) -> Any:
        system, user = item
        return lm(Request(model=lm.model, messages=(Message.user(user),), system=system))

    lm(Request(model=lm.model, messages=(Message.user("Hi"),), system=SYSTEM))  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        responses = list(pool.map(call, items))
    seconds = time.perf_counter() - start
    return seconds, [r.text for r in responses], sum(r.usage.output_tokens for r in responses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model folder (default: the converted SmolLM2-135M)")
    parser.add_argument("--n", type=int, default=64, help="prompts")
    parser.add_argument("--threads", type=int, default=8, help="calling threads")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import logging

    import dspy
    import torch

    from copa.lm import BatchingEngine, LocalModel
    from copa.models import SMOLLM2_ALIAS, resolve_model

    # Truncated answers are expected here (fixed max tokens); DSPy would warn on each.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    model_path = args.model or resolve_model(SMOLLM2_ALIAS)
    load_start = time.perf_counter()
    model = LocalModel(model_path)
    load_s = time.perf_counter() - load_start
    items = prompts(args.n)
    load_before = os.getloadavg()[0]

    arms: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {}
    for arm, size in (("batch_1", 1), (f"batch_{args.batch_size}", args.batch_size)):
        engine = BatchingEngine(model, max_batch_size=size, batch_wait_ms=args.batch_wait_ms,
                                default_max_tokens=args.max_tokens)
        lm = dspy.LM("local/bench", engine=engine, cache=False, max_tokens=args.max_tokens)
        try:
            seconds, texts[arm], out_tokens = run(lm, items, args.threads)
        finally:
            engine.close()
        sizes = Counter(engine.batch_sizes[1:])  # without the warm-up call
        arms[arm] = {
            "max_batch_size": size, "seconds": round(seconds, 2),
            "examples_per_s": round(args.n / seconds, 3),
            "output_tokens_per_s": round(out_tokens / seconds, 1),
            "output_tokens": out_tokens,
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        }
    base, batched = texts["batch_1"], texts[f"batch_{args.batch_size}"]
    mismatches = [i for i, (a, b) in enumerate(zip(base, batched)) if a != b]
    write_result("inference", {
        "model": model_path, "n": args.n, "threads": args.threads,
        "max_tokens": args.max_tokens, "batch_wait_ms": args.batch_wait_ms,
        "device": model.device, "torch_threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"), "batch_invariant": model.batch_invariant,
        "load_s": round(load_s, 1),
        "load_average_at_start": round(load_before, 2),
        "arms": arms,
        "speedup": round(arms[f"batch_{args.batch_size}"]["examples_per_s"]
                         / arms["batch_1"]["examples_per_s"], 2),
        "outputs_identical": not mismatches,
        "mismatched_prompts": mismatches,
        "sample": [{"user": items[i][1], "answer": batched[i]} for i in range(min(3, args.n))],
    })
    if mismatches:
        sys.exit(f"batched outputs differ from one-at-a-time ones for prompts {mismatches}")


if __name__ == "__main__":
    main()
