"""Wall time of MIPROv2 `auto: light` on the Iris demo's trained model: the command in
docs/results.md ("The prompt half"), `copa run` with the demo's training reused (optimize and
evaluate run), which issue 30 asks to finish in 15 minutes on an idle machine. Its time goes to
one long generation at a time (instruction proposals, data summaries: up to optimize.max_tokens
each), so it follows bench/decode.py's tokens/s.

    python bench/mipro.py [--run-dir runs/iris] [--recipe recipes/iris.yaml]

--run-dir: a finished Iris run to copy (its response cache is left out, so every answer is
generated); without it the recipe's run trains first, untimed. Results:
bench/results/mipro_<recipe>.json
(the run's wall time, the tokens the engine generated in it, the report's stage seconds, whose
train and merge are the untimed run's, and the arms' scores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, children_peak_rss_mb, keep_or_remove, timed, write_result  # noqa: E402

SETTINGS = ["--set", "optimize.optimizer=MIPROv2",
            "--set", "optimize.params={auto: light, max_bootstrapped_demos: 2, "
                     "max_labeled_demos: 2}"]
# copa's CLI in-process, then the engine's count of generated tokens on the last line.
IN_PROCESS = """
import sys
from copa.cli import main
try:
    main()  # reads sys.argv[1:]
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
from copa.inference.engine import generated_tokens
print("GENERATED_TOKENS", generated_tokens())
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "iris.yaml")
    parser.add_argument("--run-dir", type=Path, help="a finished run of the recipe to copy")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="copa-bench-mipro-"))
    run_dir = work / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        if args.run_dir:
            shutil.copytree(args.run_dir, run_dir, symlinks=True,
                            ignore=shutil.ignore_patterns("cache"))
            train_s = None
        else:
            train_s, result = timed([sys.executable, "-m", "copa.cli", "run", str(args.recipe),
                                     "--run-dir", str(run_dir)], env=env)
            if result.returncode:
                sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
        seconds, result = timed([sys.executable, "-c", IN_PROCESS, "run", str(args.recipe),
                                 "--run-dir", str(run_dir), *SETTINGS], env=env)
        if result.returncode:
            sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
        tokens = int(result.stdout.rsplit("GENERATED_TOKENS", 1)[1].split()[0])
        report = json.loads((run_dir / "report.json").read_text())
        write_result(f"mipro_{args.recipe.stem}", {
            "command": f"copa run {args.recipe} " + " ".join(SETTINGS),
            "wall_s": round(seconds, 1), "stage_seconds": report["stage_seconds"],
            "generated_tokens": tokens,
            "generated_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "demo_run_s (untimed part)": None if train_s is None else round(train_s, 1),
            "peak_child_rss_mb": round(children_peak_rss_mb()),
            "target_s": 900, "met": seconds <= 900,
            "arms": {a: round(d["score"], 4) for a, d in report["arms"].items()},
            "stage_log_tail": (result.stdout.rsplit("GENERATED_TOKENS", 1)[0]
                               + result.stderr)[-3000:],
        })
    finally:
        keep_or_remove(work, args.keep, shown=run_dir)


if __name__ == "__main__":
    main()
