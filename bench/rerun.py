"""Re-run time after editing only the `optimize:` section, over the full-run time (goal <= 0.1).
Results: bench/results/rerun.json.

    python bench/rerun.py [--recipe recipes/iris.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, timed, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "iris.yaml"))
    parser.add_argument("--run-dir", default=None, help="reuse a finished run directory")
    parser.add_argument("--candidates", type=int, default=2,
                        help="the edit: optimize.params.num_candidate_programs becomes this")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="copa-bench-rerun-"))
    copa = [sys.executable, "-m", "copa.cli", "run", args.recipe, "--run-dir", str(run_dir)]
    manifest = run_dir / "manifest.json"
    full_file = run_dir / "bench-full-run-s.txt"  # a re-run rewrites the manifest's times
    if full_file.is_file():
        full_s = float(full_file.read_text())
    elif (run_dir / "report.json").is_file():
        # A finished run: its full-run time is what its stages took (recorded in the manifest).
        stages = json.loads(manifest.read_text())["stages"]
        full_s = sum(entry.get("seconds", 0) for entry in stages.values())
    else:
        full_s, result = timed(copa)
        if result.returncode:
            sys.exit(result.stderr)
    full_file.write_text(f"{full_s:.1f}\n")
    # The optimizer's settings change: training and merge must come from the cache.
    edit = ["--set", f"optimize.params.num_candidate_programs={args.candidates}"]
    rerun_s, result = timed([*copa, *edit])
    if result.returncode:
        sys.exit(result.stderr)
    skipped = [line for line in result.stdout.splitlines() if "skipped" in line]
    write_result("rerun", {"recipe": args.recipe, "full_run_s": round(full_s, 1),
                           "rerun_after_optimize_edit_s": round(rerun_s, 1),
                           "ratio": round(rerun_s / full_s, 3), "skipped": skipped,
                           "note": "the re-run still re-optimizes and re-evaluates, as it must"})


if __name__ == "__main__":
    main()
