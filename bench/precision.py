"""fp32 vs bf16 on this CPU: matrix products (SmolLM2-135M's MLP shape), LoRA training steps
through `copa train` (finetune.precision), and copa's engine on task test rows
(serve.precision): examples/s, the metric, and how many answers bf16 changed.
Results: bench/results/precision.json.

    python bench/precision.py [--recipes iris banking77] [--n 64] [--steps 12] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, score_on_engine, timed, write_result  # noqa: E402

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
PRECISIONS = ("fp32", "bf16")


def matmul_gflops(rows: int = 512, n_in: int = 576, n_out: int = 1536,
                  seconds: float = 3.0) -> dict[str, float]:
    """GFLOP/s of [rows, n_in] @ [n_in, n_out] in each precision (a 512-token prefill through
    SmolLM2-135M's MLP up-projection)."""
    import torch

    out = {}
    for name in PRECISIONS:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        a, b = torch.randn(rows, n_in).to(dtype), torch.randn(n_in, n_out).to(dtype)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        out[name] = round(2 * rows * n_in * n_out * count / (time.perf_counter() - start) / 1e9,
                          1)
    return out


def train_steps(recipe: str, steps: int, name: str) -> dict[str, Any]:
    """`copa train` for `steps` steps: seconds per step after the first (the first holds
    start-up work) and the last step's loss."""
    work = Path(tempfile.mkdtemp(prefix=f"copa-bench-{name}-"))
    try:
        seconds, result = timed([sys.executable, "-m", "copa.cli", "train", recipe,
                                 "--run-dir", str(work), "--set", f"finetune.max_steps={steps}",
                                 "--set", "finetune.save_steps=1000",
                                 "--set", f"finetune.precision={name}"])
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        events = [json.loads(line) for line in
                  (work / "train" / "progress.jsonl").read_text().splitlines()]
        step_events = [e for e in events if e.get("event") == "step"]
        first, last = step_events[0], step_events[-1]
        return {"wall_s": round(seconds, 1),
                "s_per_step": round((last["time"] - first["time"]) / (len(step_events) - 1), 2),
                "last_loss": round(last["loss"], 4)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def engine_run(name: str, n: int, threads: int, demos: int, model_path: str | None = None,
               split: str = "test") -> dict[str, Any]:
    """copa's engine (packed, batched) in each precision on the base model (or model_path, e.g.
    a run's merged model): speed, metric, and the rows of `split` whose answer bf16 changed."""
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
    testset = to_examples(recipe, list(getattr(checked.splits, split)[:n]))
    program = kit.program.deepcopy()
    for predictor in program.predictors():
        predictor.demos = to_examples(recipe, list(checked.splits.train[:demos]))
    field = recipe.task.output_fields[-1]
    out: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    for precision in PRECISIONS:
        model = LocalModel(model_path or base_model_path(recipe), precision=precision)
        engine = BatchingEngine(model, max_batch_size=8,
                                default_max_tokens=recipe.evaluate.max_tokens)
        mean, results, seconds = score_on_engine(engine, f"{name}-{precision}", kit, program,
                                                 testset, threads, recipe.evaluate.max_tokens)
        answers[precision] = [str(getattr(p, field, "")) for _, p, _ in results]
        out[precision] = {"examples_per_s": round(len(testset) / seconds, 3),
                          "metric": round(mean, 4), "gemm": model.gemm,
                          "batch_invariant": model.batch_invariant}
    out["bf16_speedup"] = round(out["bf16"]["examples_per_s"] / out["fp32"]["examples_per_s"], 2)
    out["answers_changed"] = sum(a != b for a, b in zip(answers["fp32"], answers["bf16"]))
    out["n"] = len(testset)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["iris", "banking77"])
    parser.add_argument("--demos", nargs="+", type=int, default=[0, 3])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--merged", nargs="*", default=[], metavar="RECIPE=DIR",
                        help="also score a run's merged model (plain program) on the first "
                        "--n rows of val and of test, e.g. iris=runs/iris/merged")
    args = parser.parse_args()
    import torch

    from copa import precision

    result: dict[str, Any] = {
        "cpu_native_bf16": precision.native_bf16_cpu(),
        "cpu_bf16_flags": sorted(precision.cpu_flags() & set(precision.NATIVE_BF16_FLAGS)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "matmul_gflops": matmul_gflops(),
    }
    if not args.skip_train:
        recipe = str(REPO / "recipes" / "iris.yaml")
        result["train_iris"] = {p: train_steps(recipe, args.steps, p) for p in PRECISIONS}
    result["engine"] = {f"{name}, {demos} demos": engine_run(name, args.n, args.threads, demos)
                        for name in args.recipes for demos in args.demos}
    for item in args.merged:
        name, _, path = item.partition("=")
        for split in ("val", "test"):
            result["engine"][f"{name} merged, {split}"] = engine_run(
                name, args.n, args.threads, 0, model_path=path, split=split)
    write_result("precision", result)


if __name__ == "__main__":
    main()
