"""What MLflow tracking adds to the demo's wall time (the goal: at most 3 %).

The Iris demo (`copa run recipes/iris.yaml`) from an empty run directory, untracked
(COPA_TRACK=off) and tracked into a NEW local store (the worst case: MLflow's import and the
sqlite store's creation are paid in full), alternated `--pairs` times so drift on the machine
hits both; plus the pieces alone: `import mlflow`, creating a store, one run's logging.
Results: bench/results/tracking.json. Time it on an otherwise idle machine.

    python bench/tracking.py [--recipe recipes/iris.yaml] [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, timed, write_result  # noqa: E402

PIECES = """
import time, sys
t = time.time(); import mlflow; from mlflow.tracking import MlflowClient
imported = time.time() - t
t = time.time(); c = MlflowClient(tracking_uri=sys.argv[1]); e = c.create_experiment("x")
created = time.time() - t
t = time.time(); r = c.create_run(e); c.log_param(r.info.run_id, "a", "1")
c.log_metric(r.info.run_id, "m", 0.5); c.set_terminated(r.info.run_id)
print(imported, created, time.time() - t)
"""


def demo(recipe: str, store: str | None) -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="copa-bench-track-"))
    env = {**os.environ, "COPA_TRACK": store or "off"}
    try:
        seconds, result = timed([sys.executable, "-m", "copa.cli", "run", recipe,
                                 "--run-dir", str(run_dir)], env=env)
        if result.returncode:
            sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
        return seconds
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "iris.yaml"))
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="copa-bench-mlflow-"))
    try:
        _, pieces = timed([sys.executable, "-c", PIECES, f"sqlite:///{scratch / 'p.db'}"])
        imported, created, logged = (float(x) for x in pieces.stdout.split())
        off, on = [], []
        for i in range(args.pairs):
            store = f"sqlite:///{scratch / f'run{i}.db'}"  # a new store every time
            order = [(off, None), (on, store)] if i % 2 == 0 else [(on, store), (off, None)]
            for times, uri in order:
                times.append(demo(args.recipe, uri))
        overhead = statistics.median(on) / statistics.median(off) - 1
        write_result("tracking", {
            "recipe": args.recipe, "pairs": args.pairs,
            "untracked_s": [round(s, 1) for s in off], "tracked_s": [round(s, 1) for s in on],
            "overhead_pct": round(100 * overhead, 2), "goal_pct": 3.0,
            "within_goal": overhead <= 0.03,
            "pieces_s": {"import_mlflow": round(imported, 2),
                         "create_sqlite_store": round(created, 2),
                         "one_run_logged": round(logged, 2)}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
