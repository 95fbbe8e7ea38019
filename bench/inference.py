"""Examples/s of DSPy Evaluate on task test splits: one request at a time vs. copa's batching
engine, same base model, same TemplateAdapter prompts, 8 threads (as dspy.Evaluate runs them).
The two runs must give identical predictions. Results: bench/results/inference.json.

    python bench/inference.py [--recipes iris banking77] [--n 64] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def bench_recipe(name: str, n: int, threads: int, batch_size: int) -> dict[str, Any]:
    import logging

    import dspy

    from copa.checks import check_recipe
    from copa.lm import BatchingEngine, LocalModel
    from copa.optimizer import base_model_path, score, task_kit
    from copa.program import to_examples
    from copa.recipe import load_recipe

    logging.getLogger("dspy").setLevel(logging.ERROR)
    checked = check_recipe(load_recipe(REPO / "recipes" / f"{name}.yaml"))
    recipe = checked.recipe
    kit = task_kit(recipe, [], [], checked.spec)
    testset = to_examples(recipe, list(checked.splits.test[:n]))
    model = LocalModel(base_model_path(recipe))
    arms: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    field = recipe.task.output_fields[-1]
    for arm, size in (("batch_1", 1), (f"batch_{batch_size}", batch_size)):
        engine = BatchingEngine(model, max_batch_size=size,
                                default_max_tokens=recipe.evaluate.max_tokens)
        lm = dspy.LM(f"local/{name}", engine=engine, cache=False,
                     max_tokens=recipe.evaluate.max_tokens)
        try:
            with dspy.context(lm=lm, adapter=kit.adapter):
                start = time.perf_counter()
                mean, results = score(kit.program, testset, kit.metric, threads)
                seconds = time.perf_counter() - start
        finally:
            engine.close()
        predictions[arm] = [str(getattr(p, field, "")) for _, p, _ in results]
        arms[arm] = {"max_batch_size": size, "seconds": round(seconds, 2),
                     "examples_per_s": round(len(testset) / seconds, 3),
                     "metric": round(mean, 4),
                     "batch_sizes": {str(k): v for k, v in
                                     sorted(Counter(engine.batch_sizes).items())}}
    one, many = predictions["batch_1"], predictions[f"batch_{batch_size}"]
    mismatches = [i for i, (a, b) in enumerate(zip(one, many)) if a != b]
    return {"n": len(testset), "arms": arms,
            "speedup": round(arms[f"batch_{batch_size}"]["examples_per_s"]
                             / arms["batch_1"]["examples_per_s"], 2),
            "outputs_identical": not mismatches, "mismatched_rows": mismatches,
            "max_tokens": recipe.evaluate.max_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["iris", "banking77"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    load = os.getloadavg()[0]
    results = {name: bench_recipe(name, args.n, args.threads, args.batch_size)
               for name in args.recipes}
    write_result("inference", {"threads": args.threads, "torch_threads": torch.get_num_threads(),
                               "mkl_cbwr": os.environ.get("MKL_CBWR"),
                               "load_average_at_start": round(load, 2), "recipes": results})
    if not all(r["outputs_identical"] for r in results.values()):
        sys.exit("batched predictions differ from one-at-a-time ones")


if __name__ == "__main__":
    main()
