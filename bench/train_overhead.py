"""Wall time of `copa train` vs a plain `axolotl train` on the same rendered config, and
training tokens/s. Results: bench/results/train_overhead.json.

    python bench/train_overhead.py [--recipe recipes/iris.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, timed, write_result  # noqa: E402


def count_tokens(train_jsonl: Path, model_dir: str, rows: int) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = train_jsonl.read_text().splitlines()
    total = 0
    for i in range(rows):  # the trainer cycles through the rows epoch after epoch
        messages = [{"role": m["role"], "content": m["content"]}
                    for m in json.loads(lines[i % len(lines)])["messages"]]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "iris.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="copa-bench-train-"))
    copa = [sys.executable, "-m", "copa.cli"]
    overrides = ["--set", f"finetune.max_steps={args.steps}", "--set", "finetune.save_steps=1000"]

    copa_s, result = timed([*copa, "train", args.recipe, "--run-dir", str(work / "copa"),
                            *overrides])
    if result.returncode:
        sys.exit(result.stderr)
    rendered = work / "copa" / "rendered"
    config = (rendered / "axolotl.yml").read_text().replace(
        str(work / "copa" / "train"), str(work / "plain"))
    (work / "plain.yml").write_text(config)
    plain_s, result = timed([sys.executable, "-m", "axolotl.cli.main", "train",
                             str(work / "plain.yml"), "--launcher", "python"],
                            env={**__import__("os").environ, "AXOLOTL_DO_NOT_TRACK": "1",
                                 "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(result.stdout[-3000:])
    import yaml

    cfg = yaml.safe_load(config)
    rows = args.steps * cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"]
    tokens = count_tokens(rendered / "train.jsonl", cfg["base_model"], rows)
    write_result("train_overhead", {
        "recipe": args.recipe, "steps": args.steps,
        "copa_train_s": round(copa_s, 1), "plain_axolotl_train_s": round(plain_s, 1),
        "overhead_s": round(copa_s - plain_s, 1),
        "note": "copa_train_s includes rendering (data, templates, config validation)",
        "train_tokens_approx": tokens,
        "tokens_per_s_plain": round(tokens / plain_s, 1),
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
