"""Examples/s of DSPy Evaluate on task test splits: one request at a time (transformers'
generate) vs. copa's engine (packed decoding, prefix cache, batching), and copa's decoding one
request at a time; same base model, same TemplateAdapter prompts, 8 threads (as dspy.Evaluate
runs them), for a zero-shot program and one with few-shot demos. All runs must give identical
predictions.
Results: bench/results/inference.json (inference_bf16.json with --precision bf16).

    python bench/inference.py [--recipes iris banking77] [--n 64] [--threads 8] [--precision bf16]
    python bench/inference.py --recipes gsm8k --n 40 --demos 0 --arms engine --name gsm8k_eval
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, score_on_engine, write_result  # noqa: E402

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


ARMS = (  # name, packed decoding + prefix cache, max batch size
    ("one_at_a_time", False, 1),   # the baseline: transformers' generate, one request at a time
    ("engine_batch_1", True, 1),   # copa's decoding without batching
    ("engine", True, None),        # copa's engine: packed decoding, prefix cache, batching
)
# Where the CPU's BLAS does not keep GEMM rows independent (AMD), the model pads or blocks its
# rows (copa.inference.rowgemm); this extra arm times the engine with plain GEMMs, i.e. what the
# batch-invariance costs. Its predictions may differ from the others: not counted as a failure.
NATIVE_ARM = ("engine_native_gemm", True, None)


def bench_recipe(name: str, n: int, threads: int, batch_size: int,
                 demos: int, precision: str = "fp32",
                 only: list[str] | None = None) -> dict[str, Any]:
    import logging

    from copa.checks import check_recipe
    from copa.dspy.kit import base_model_path, task_kit
    from copa.dspy.program import to_examples
    from copa.inference.engine import BatchingEngine
    from copa.inference.local import LocalModel
    from copa.recipe import load_recipe

    logging.getLogger("dspy").setLevel(logging.ERROR)
    checked = check_recipe(load_recipe(REPO / "recipes" / f"{name}.yaml"))
    recipe = checked.recipe
    kit = task_kit(recipe, [], [], checked.spec)
    testset = to_examples(recipe, list(checked.splits.test[:n]))
    program = kit.program
    if demos:  # as a few-shot optimizer leaves it: the same labeled demos in every prompt
        program = program.deepcopy()
        for predictor in program.predictors():
            predictor.demos = to_examples(recipe, list(checked.splits.train[:demos]))
    model = LocalModel(base_model_path(recipe), trust_remote_code=recipe.model.trust_remote_code,
                       precision=precision)
    arms: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    field = recipe.task.output_fields[-1]
    from copa.inference import rowgemm

    arms_here = ARMS + ((NATIVE_ARM,) if model.gemm in ("padded", "blocked") else ())
    arms_here = tuple(a for a in arms_here if only is None or a[0] in only)
    if not arms_here:
        sys.exit(f"--arms {' '.join(only or [])}: none of them runs here (the native-GEMM arm "
                 f"only where the model computes in padded or blocked rows; it has {model.gemm})")
    for arm, copa_decoding, size in arms_here:
        size = size or batch_size
        if arm == NATIVE_ARM[0]:
            rowgemm.use(model.model, "native")
        model.packed = model.prefix_cache = copa_decoding
        model.clear_prefix_cache()  # every arm starts cold
        engine = BatchingEngine(model, max_batch_size=size,
                                default_max_tokens=recipe.evaluate.max_tokens)
        try:
            mean, results, seconds = score_on_engine(engine, name, kit, program, testset,
                                                     threads, recipe.evaluate.max_tokens)
        finally:
            if arm == NATIVE_ARM[0]:
                rowgemm.use(model.model, model.gemm)
        predictions[arm] = [str(getattr(p, field, "")) for _, p, _ in results]
        arms[arm] = {"copa_decoding": copa_decoding, "max_batch_size": size,
                     "seconds": round(seconds, 2),
                     "generating_s": round(engine.generate_seconds, 2),
                     "generated_tokens": engine.generated_tokens,
                     "generated_tokens_per_s": round(engine.generated_tokens / seconds, 1),
                     "examples_per_s": round(len(testset) / seconds, 3),
                     "metric": round(mean, 4),
                     "batch_sizes": {str(k): v for k, v in
                                     sorted(Counter(engine.batch_sizes).items())}}
    prompt = model.split_prompt(kit.adapter.format(
        program.predictors()[0].signature, program.predictors()[0].demos,
        {k: testset[0][k] for k in testset[0].inputs().keys()}))
    native = predictions.pop(NATIVE_ARM[0], None)
    base = next(iter(predictions.values()), native)  # one at a time unless --arms left it out
    mismatches = sorted({i for arm in predictions for i, (a, b)
                         in enumerate(zip(base, predictions[arm])) if a != b})
    per_s = {arm: arms[arm]["examples_per_s"] for arm in arms}
    speedups = {} if only is not None else {  # a ratio needs both of its arms
        "speedup": round(per_s["engine"] / per_s["one_at_a_time"], 2),
        "speedup_from_batching": round(per_s["engine"] / per_s["engine_batch_1"], 2)}
    return {"n": len(testset), "demos": demos, "max_tokens": recipe.evaluate.max_tokens,
            "prompt_tokens": {"cached_prefix": len(prompt[0]), "rest": len(prompt[1])},
            "gemm": model.gemm, "arms": arms, **speedups,
            "outputs_identical": not mismatches, "mismatched_rows": mismatches,
            **({"row_blocks_cost": round(per_s[NATIVE_ARM[0]] / per_s["engine"], 3),
                "native_gemm_mismatched_rows": sum(a != b for a, b in zip(base, native))}
               if native is not None and "engine" in per_s else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["iris", "banking77"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--demos", nargs="+", type=int, default=[0, 3],
                        help="programs to time: with this many few-shot demos each")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the dtype the model computes in (serve.precision)")
    parser.add_argument("--arms", nargs="+", choices=[a[0] for a in (*ARMS, NATIVE_ARM)],
                        help="time only these arms (e.g. engine: GSM8K's evaluation)")
    parser.add_argument("--name", help="result file bench/results/NAME.json")
    args = parser.parse_args()
    import torch

    load = os.getloadavg()[0]
    results = {f"{name}, {demos} demos": bench_recipe(name, args.n, args.threads,
                                                      args.batch_size, demos, args.precision,
                                                      args.arms)
               for name in args.recipes for demos in args.demos}
    default = "inference" if args.precision == "fp32" else f"inference_{args.precision}"
    write_result(args.name or default,
                 {"precision": args.precision, "threads": args.threads,
                  "torch_threads": torch.get_num_threads(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
                  "load_average_at_start": round(load, 2), "recipes": results})
    if not all(r["outputs_identical"] for r in results.values()):
        sys.exit("batched predictions differ from one-at-a-time ones")


if __name__ == "__main__":
    main()
