"""Wall time of the demo (`copa run recipes/iris.yaml`) from an empty run directory, with the
embedded model already converted. Results: bench/results/demo.json (and the report table).

    python bench/demo.py [--recipe recipes/iris.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, children_peak_rss_mb, keep_or_remove, timed, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "iris.yaml"))
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="copa-bench-demo-"))
    seconds, result = timed([sys.executable, "-m", "copa.cli", "run", args.recipe,
                             "--run-dir", str(run_dir)])
    if result.returncode:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
    report = json.loads((run_dir / "report.json").read_text())
    write_result(Path(args.recipe).stem + "_run", {
        "recipe": args.recipe, "wall_s": round(seconds, 1),
        "peak_child_rss_mb": round(children_peak_rss_mb()),
        "stage_seconds": report["stage_seconds"],
        "arms": {a: {"score": round(d["score"], 4), "ci95": [round(x, 4) for x in d["ci95"]]}
                 for a, d in report["arms"].items()},
        "synergy": report.get("synergy"), "finetune_gain": report.get("finetune_gain"),
        "prompt_optimization": report.get("prompt_optimization"),
        "report_md": (run_dir / "report.md").read_text(),
    })
    keep_or_remove(run_dir, args.keep)


if __name__ == "__main__":
    main()
