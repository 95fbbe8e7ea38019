"""Re-score finished runs' predictions with copa.metrics as of a git revision (the old metric)
and as in this working tree (the new one), row by row: a change to scoring must not move a
published number unnoticed.

    python bench/rescore.py --old HEAD runs ../other-checkout/runs

Every predictions/<arm>.jsonl under the given folders is read (nothing is written there), with
the metric and choices of the run's recipe.json beside predictions/. The evaluate stage wrote
each row's "gold", the answer field's "prediction" and its "score" (copa.stages.evaluate), so
a row is re-scored as that stage scored it: make_metric(...)({field: gold}, {field: pred}).
Rows whose call failed ("error": true) scored 0 without the metric and are only counted.
Prints the counts per metric, every row whose old and new scores differ, and every row whose
stored score the old metric does not reproduce; exit 1 if any differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def old_metrics(revision: str) -> Any:
    """copa/metrics.py as of `revision`, imported under its own name beside the new one."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:copa/metrics.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_copa_metrics.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_copa_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Its make_metric looks built-ins up by 'copa.metrics:name' (copa.registry): that would be
    # the new module's functions. Resolve them in the old module itself.
    found = module.builtin

    def builtin(path: str) -> Any:
        where, _, name = path.partition(":")
        return getattr(module, name) if where == "copa.metrics" else found(path)

    module.builtin = builtin
    return module


def prediction_files(roots: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for root in roots:
        for path in sorted(root.rglob("predictions/*.jsonl")):
            recipe = path.parent.parent / "recipe.json"
            if not recipe.is_file():
                print(f"skipped (no recipe.json beside it): {path}")
                continue
            yield path, json.loads(recipe.read_text())["recipe"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="HEAD", help="git revision of the old metric")
    parser.add_argument("roots", nargs="+", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import copa.metrics as new

    old = old_metrics(args.old)
    files, rows, failed = Counter(), Counter(), 0
    changed, unreproduced = [], []
    for path, recipe in prediction_files(args.roots):
        name = recipe["evaluate"]["metric"]
        choices = recipe["task"].get("choices")
        field = "answer"
        answers = "answers" if recipe["data"].get("answers_column") else None
        metrics = [m.make_metric(name, field, choices, answers_field=answers) for m in (old, new)]
        files[name] += 1
        for n, line in enumerate(path.read_text().splitlines(), 1):
            row = json.loads(line)
            if row.get("error"):
                failed += 1
                continue
            example = {field: row["gold"], **({answers: row["answers"]} if answers
                                              and "answers" in row else {})}
            prediction = {field: row["prediction"] or ""}
            before, after = (float(m(example, prediction)) for m in metrics)
            rows[name] += 1
            where = f"{path}:{n} gold={row['gold']!r} prediction={row['prediction']!r}"
            if before != after:
                changed.append(f"{where}: {before} -> {after}")
            if before != float(row["score"]):
                unreproduced.append(f"{where}: stored {row['score']}, old metric {before}")
    for name in files:
        print(f"{name}: {files[name]} files, {rows[name]} rows re-scored")
    print(f"failed calls (scored 0 without the metric, not re-scored): {failed}")
    print(f"rows whose score changed: {len(changed)}")
    print("\n".join(changed))
    print(f"rows whose stored score the old metric does not reproduce: {len(unreproduced)}")
    print("\n".join(unreproduced))
    return 1 if changed or unreproduced else 0


if __name__ == "__main__":
    sys.exit(main())
