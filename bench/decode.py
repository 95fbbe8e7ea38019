"""One long sequence at a time (a MIPROv2 proposal, a GEPA reflection, a chain of thought):
tokens/s of copa's decode loop for one sequence with 128 / 512 / 2048 prompt tokens generating
512, in fp32 and (where the CPU has it natively) bf16, without and with drafted tokens
(copa.inference.draft; the tokens must be the same); next to it the memory-bandwidth bound
measured on this machine (a read of the model's weight bytes, best of several) and
transformers' own `generate` on the same weights; and where one decode step's time goes
(timing hooks around matrix products, attention, cache writes and sampling; the rest is Python
and small ops), plus torch.profiler's top operators. Results: bench/results/decode.json.

    python bench/decode.py                                # the full run (~10 min idle)
    python bench/decode.py --prompt 128 --new 64 --precisions fp32 --no-hf   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """n tokens of real English (this repository's docs, repeated as needed)."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return list(ids[:n])


def bandwidth_gbs(n_bytes: int, repeats: int = 7) -> float:
    """GB/s of summing a float32 tensor of n_bytes (every byte read once), best of `repeats`."""
    import torch

    data = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best / 1e9


def copa_decode(model: Any, ids: list[int], new: int,
                draft_tokens: int | None = None) -> dict[str, Any]:
    """copa's decode loop (copa.inference.decoder), one row, no early stop; draft_tokens=0:
    without drafts (None: copa's default). With them: how many tokens were guessed and how
    many held."""
    import torch

    from copa.inference import decoder, packed

    first: list[float] = []

    def never_done(row: int, tokens: list[int]) -> None:
        if not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    loop = decoder.Decoder(model, never_done, draft_tokens)
    loop.add([packed.Row(tokens=ids, max_new=new)])
    ended = []
    with torch.inference_mode():
        while loop:
            ended += loop.step()
    end = time.perf_counter()
    out = ended[0][1]
    assert len(out) == new
    drafts = {"drafted": loop.drafted, "held": loop.accepted} if draft_tokens != 0 else {}
    return _speeds(start, first[0], end, new) | drafts | {"ids": out}


def wrong_guesses(model: Any, ids: list[int], new: int) -> dict[str, Any]:
    """copa_decode with every guess wrong: the lookup always guesses token 0 (never SmolLM2's
    pick here), so this times what guessing costs when it never pays (Pace's pauses)."""
    from copa.inference import decoder

    class Wrong:
        def __init__(self, tokens: list[int]) -> None:
            pass

        def extend(self, tokens: list[int]) -> None:
            pass

        def draft(self, k: int) -> list[int]:
            return [0] * k

    real, decoder.PromptLookup = decoder.PromptLookup, Wrong
    try:
        return copa_decode(model, ids, new)
    finally:
        decoder.PromptLookup = real


def hf_generate(model: Any, ids: list[int], new: int) -> dict[str, float]:
    """transformers' generate on the same module (outside a packed batch copa's attention is
    transformers' SDPA), greedy, exactly `new` tokens."""
    import torch
    import transformers

    first: list[float] = []

    class FirstToken(transformers.StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if not first:
                first.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    config = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False, num_beams=1, eos_token_id=None,
                                           pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), generation_config=config,
                             stopping_criteria=transformers.StoppingCriteriaList([FirstToken()]))
    end = time.perf_counter()
    return _speeds(start, first[0], end, new) | {"ids": out[0, len(ids):].tolist()}


def _speeds(start: float, first: float, end: float, new: int) -> dict[str, float]:
    return {"prefill_s": round(first - start, 3), "decode_tokens_per_s":
            round((new - 1) / (end - first), 2), "tokens_per_s": round(new / (end - start), 2),
            "wall_s": round(end - start, 2)}


def step_profile(model: Any, ids: list[int], steps: int = 24) -> dict[str, Any]:
    """Where one decode step's time goes, at a context of len(ids) tokens: wall time per step,
    and the part inside matrix products (every nn.Linear, the LM head among them), attention
    over the cache, cache writes and the pick of the next token (argmax); 'rest' is everything
    else (Python, norms, rotary embeddings, transformers' glue). Timing hooks add ~µs each."""
    import torch

    from copa.inference import packed

    spent = {"linear": 0.0, "lm_head": 0.0, "attention": 0.0, "cache_write": 0.0,
             "sampling": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    lm_head = model.get_output_embeddings()
    for m in linears:
        m.forward = timed("lm_head" if m is lm_head else "linear", m.forward)
    originals = packed.PackedBatch.attend, packed.PackedBatch.update
    packed.PackedBatch.attend = timed("attention", packed.PackedBatch.attend)
    packed.PackedBatch.update = timed("cache_write", packed.PackedBatch.update)
    try:
        with torch.inference_mode():
            batch = packed.PackedBatch([packed.Row(tokens=ids, max_new=steps + 1)])
            token = int(batch.forward(model, {0: ids})[0].argmax())
            for key in spent:
                spent[key] = 0.0
            start = time.perf_counter()
            for _ in range(steps):
                logits = batch.forward(model, {0: [token]})
                pick = time.perf_counter()
                token = int(logits.argmax(-1).tolist()[0])
                spent["sampling"] += time.perf_counter() - pick
            wall = time.perf_counter() - start
            per_step = {k: v / steps for k, v in spent.items()}  # before the profiler's steps
            # torch.profiler's view of a few more steps (its own overhead inflates the total)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(4):
                    token = int(batch.forward(model, {0: [token]})[0].argmax())
            table = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            ops = [{"op": e.key, "calls_per_step": e.count // 4,
                    "self_ms_per_step": round(e.self_cpu_time_total / 4 / 1000, 3)}
                   for e in table]
    finally:
        for m in linears:
            vars(m).pop("forward", None)
        packed.PackedBatch.attend, packed.PackedBatch.update = originals
    ms = {k: round(v * 1000, 2) for k, v in per_step.items()}
    step_ms = wall / steps * 1000
    ms["rest_python_and_small_ops"] = round(step_ms - sum(ms.values()), 2)
    return {"context_tokens": len(ids), "step_ms": round(step_ms, 2), "ms_per_step": ms,
            "profiler_top_ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--wrong-guesses", action="store_true",
                        help="also time drafts that are always wrong (their worst case)")
    parser.add_argument("--profile-steps", type=int, default=24)
    parser.add_argument("--name", default="decode", help="result file bench/results/NAME.json")
    args = parser.parse_args()

    import torch

    from copa import precision as prec
    from copa.checks import check_recipe
    from copa.dspy.kit import base_model_path
    from copa.inference.local import LocalModel
    from copa.recipe import load_recipe

    native_bf16 = prec.native_bf16_cpu()
    path = base_model_path(check_recipe(load_recipe(REPO / "recipes" / "iris.yaml")).recipe)
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, de-quantized)",
        "cpu_native_bf16": native_bf16, "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "prompt_tokens": args.prompt, "new_tokens": args.new, "runs": {}}
    for name in args.precisions:
        if name == "bf16" and not native_bf16:
            result["runs"]["bf16"] = "skipped: no native bf16 on this CPU"
            continue
        model = LocalModel(path, precision=name)
        weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
        gbs = bandwidth_gbs(weights)
        cfg = model.model.config
        kv_per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads
                        * (cfg.hidden_size // cfg.num_attention_heads)
                        * torch.finfo(model.dtype).bits // 8)
        run: dict[str, Any] = {"gemm": model.gemm, "weight_mb": round(weights / 1e6, 1),
                               "read_gb_per_s": round(gbs, 2),
                               "bound_tokens_per_s_weights_only": round(gbs * 1e9 / weights, 1)}
        for n in args.prompt:
            ids = prompt_ids(model.tokenizer, n)
            mid = n + args.new // 2  # the mean context while decoding
            entry: dict[str, Any] = {"bound_tokens_per_s": round(
                gbs * 1e9 / (weights + kv_per_token * mid), 1)}
            plain = copa_decode(model.model, ids, args.new, draft_tokens=0)
            ours = copa_decode(model.model, ids, args.new)
            assert ours["ids"] == plain["ids"], "drafts changed the greedy answer"
            entry["copa_without_drafts"] = {k: v for k, v in plain.items() if k != "ids"}
            entry["copa_without_drafts_of_bound"] = round(
                plain["decode_tokens_per_s"] / entry["bound_tokens_per_s"], 2)
            entry["copa"] = {k: v for k, v in ours.items() if k != "ids"}
            if args.wrong_guesses:
                worst = wrong_guesses(model.model, ids, args.new)
                assert worst["ids"] == plain["ids"], "wrong guesses changed the greedy answer"
                entry["copa_wrong_guesses"] = {k: v for k, v in worst.items() if k != "ids"}
            if not args.no_hf:
                theirs = hf_generate(model.model, ids, args.new)
                entry["transformers_generate"] = {k: v for k, v in theirs.items() if k != "ids"}
                same = next((i for i, (a, b) in enumerate(zip(ours["ids"], theirs["ids"]))
                             if a != b), len(ours["ids"]))
                entry["same_tokens_as_generate"] = same  # leading tokens that agree
            run[f"prompt_{n}"] = entry
            print(name, n, entry, flush=True)
        run["step_profile"] = step_profile(model.model, prompt_ids(model.tokenizer, max(
            args.prompt)), args.profile_steps)
        result["runs"][name] = run
        del model
    write_result(args.name, result)


if __name__ == "__main__":
    main()
