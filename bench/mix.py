"""A long generation and many short ones at once (issue 30, part 3): a MIPROv2 proposal or a
chain of thought decoding while DSPy evaluates short classification prompts beside it. Do the
short requests keep flowing, or do they wait for the long one?

Three phases on one BatchingEngine (SmolLM2, fp32, the engine's defaults):
  short alone   N short chats (~80 prompt tokens, up to 8 new) from `--callers` threads
  long alone    one chat of `--prompt` tokens generating `--new`
  mixed         the long chat first, then (a fifth into its time alone, past its prefill)
                the same short chats
Per phase: wall seconds, the short requests' latency (median, 90th percentile, max) and the
long one's seconds; whether every short answer in the mix equals its answer alone (a row's
tokens do not depend on its batch mates). Results: bench/results/NAME.json.

    python bench/mix.py                          # 2048 + 512 long, 48 short, 8 callers
    python bench/mix.py --prompt 256 --new 64 --short 8   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402
from decode import prompt_ids  # noqa: E402

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SHORT_TEMPLATE = ("Classify the iris flower by its measurements. Answer with one of: setosa, "
                  "versicolor, virginica.\nsepal length {a} cm, sepal width {b} cm, petal length "
                  "{c} cm, petal width {d} cm.\nSpecies:")


def short_chats(n: int) -> list[list[dict[str, str]]]:
    """n distinct short classification prompts."""
    return [[{"role": "user", "content": SHORT_TEMPLATE.format(
        a=4.3 + (i % 30) / 10, b=2.0 + (i % 20) / 10, c=1.0 + (i % 50) / 10,
        d=0.1 + (i % 25) / 10)}] for i in range(n)]


def run_shorts(engine: Any, chats: list[Any], callers: int, max_tokens: int
               ) -> tuple[list[str], list[float], float]:
    """The chats from `callers` threads, each waiting for its answer (as DSPy's Evaluate does);
    returns the answers, each request's latency and the wall seconds."""
    def one(chat: Any) -> tuple[str, float]:
        start = time.perf_counter()
        text = engine.submit(chat, max_tokens).result().text
        return text, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        done = list(pool.map(one, chats))
    return [t for t, _ in done], [s for _, s in done], time.perf_counter() - start


def latency(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median_s": round(statistics.median(ordered), 3),
            "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max_s": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2048, help="the long chat's prompt tokens")
    parser.add_argument("--new", type=int, default=512, help="the long chat's max new tokens")
    parser.add_argument("--short", type=int, default=48, help="short requests")
    parser.add_argument("--short-new", type=int, default=8)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--name", default="mix", help="result file bench/results/NAME.json")
    args = parser.parse_args()

    import torch

    from copa.checks import check_recipe
    from copa.dspy.kit import base_model_path
    from copa.inference.engine import BatchingEngine
    from copa.inference.local import LocalModel
    from copa.recipe import load_recipe

    path = base_model_path(check_recipe(load_recipe(REPO / "recipes" / "iris.yaml")).recipe)
    model = LocalModel(path, precision="fp32")
    engine = BatchingEngine(model)
    long_text = model.tokenizer.decode(prompt_ids(model.tokenizer, args.prompt))
    long_chat = [{"role": "user", "content": long_text + "\n\nSummarise the text above."}]
    chats = short_chats(args.short)
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, de-quantized), fp32",
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "long": {"prompt_tokens": args.prompt, "max_new": args.new},
        "short": {"requests": args.short, "max_new": args.short_new, "callers": args.callers},
        "engine": {"max_batch_size": engine.max_batch_size}}
    try:
        run_shorts(engine, chats[:2], 2, args.short_new)  # warm-up
        alone, alone_s, alone_wall = run_shorts(engine, chats, args.callers, args.short_new)
        result["short_alone"] = {"wall_s": round(alone_wall, 2), **latency(alone_s)}
        print("short alone", result["short_alone"], flush=True)

        start = time.perf_counter()
        gen = engine.submit(long_chat, args.new).result()
        result["long_alone"] = {"wall_s": round(time.perf_counter() - start, 2),
                                "output_tokens": gen.output_tokens}
        print("long alone", result["long_alone"], flush=True)

        long_done: list[float] = []  # set by the engine's thread when the long one ends
        start = time.perf_counter()
        future = engine.submit(long_chat, args.new)
        future.add_done_callback(lambda _: long_done.append(time.perf_counter()))
        # the short ones arrive a fifth into the long one's time alone: past its prefill
        time.sleep(0.2 * result["long_alone"]["wall_s"])
        mixed, mixed_s, mixed_wall = run_shorts(engine, chats, args.callers, args.short_new)
        shorts_end = time.perf_counter()
        future.result()
        result["mixed"] = {
            "short_wall_s": round(mixed_wall, 2), **latency(mixed_s),
            "long_wall_s": round(long_done[0] - start, 2),
            "shorts_finished_before_long": shorts_end < long_done[0],
            "short_answers_equal_alone": mixed == alone}
        print("mixed", result["mixed"], flush=True)
    finally:
        engine.close()
    result["short_slowdown_median"] = round(result["mixed"]["median_s"]
                                            / result["short_alone"]["median_s"], 2)
    result["long_slowdown"] = round(result["mixed"]["long_wall_s"]
                                    / result["long_alone"]["wall_s"], 2)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
