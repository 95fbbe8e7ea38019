"""A study's results as data (study.json): every cell, seed, arm and score, and per grid point
the arms' means over seeds and the effects (copa.stats.study_cell), from each cell's
report.json and per-row predictions. Reads run directories; writes nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from copa.stages.predictions import PredictionsError, read_scored_arms
from copa.stages.val import DEMO_ARM, margin_outcomes
from copa.stats import study_cell

NOT_COMPARABLE = ("synergy", "interaction")  # effects that compare against fine-tune-only


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's per-row scores per arm (arms whose every call failed left out), its
    metric and why its synergy is not comparable (if the report says so); None if unfinished."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    # checked: every arm's rows whole and the same rows (a paired bootstrap needs both)
    scores = {arm: [float(row["score"]) for row in rows]
              for arm, rows in read_scored_arms(run_dir, report).items()}
    synergy, guard = report.get("synergy") or {}, report.get("guard") or {}
    if not isinstance(synergy, dict) or not isinstance(guard, dict) or \
            not all(isinstance(e, dict) for e in guard.values()):
        raise PredictionsError(f"{run_dir / 'report.json'}: synergy or guard is not a mapping: "
                               "not a report copa wrote (re-run `copa evaluate`)")
    return {"metric": report.get("metric"), "scores": scores,
            "failed_arms": [a for a, d in report["arms"].items() if d.get("failed")],
            "not_comparable": synergy.get("reason") if synergy.get("comparable") is False
            else None,
            "guard": guard}


def aggregate(plan: Mapping[str, Any], study_dir: Path, seed: int = 0) -> dict[str, Any]:
    """study.json's data from plan.json's cells and their run directories."""
    runs, by_point = [], {}
    metric = None
    guard_entries = []
    for entry in plan["cells"]:
        found = read_run(Path(study_dir) / entry["dir"])
        row = {"cell": entry["name"], "values": entry["values"], "seed": entry["seed"],
               "dir": entry["dir"], "status": "finished" if found else "not finished"}
        if found:
            metric = metric or found["metric"]
            row |= {"scores": {a: sum(s) / len(s) for a, s in found["scores"].items() if s},
                    "test_rows": max((len(s) for s in found["scores"].values()), default=0),
                    "failed_arms": found["failed_arms"]}
        runs.append(row)
        point = by_point.setdefault(entry["name"], {"cell": entry["name"],
                                                    "values": entry["values"], "found": []})
        if found:
            point["found"].append((entry["seed"], found))
            guard_entries += [{**e, "cell": entry["name"], "seed": entry["seed"], "arm": arm}
                              for arm, e in found["guard"].items()]
    cells = [_cell(point, plan["bootstrap"], seed) for point in by_point.values()]
    arms = list(plan["arms"])
    if "finetune_only" in arms and any(DEMO_ARM in c["arms"] for c in cells):
        arms.insert(arms.index("finetune_only") + 1, DEMO_ARM)  # cells fine-tuned with demos
    return {"study": plan["study"], "file": plan.get("file"), "recipe": plan["recipe"],
            "metric": metric, "grid": plan["grid"], "seeds": plan["seeds"], "arms": arms,
            "bootstrap": plan["bootstrap"],
            "method": "arm means averaged over seeds; 95% intervals by a paired bootstrap that "
                      "resamples each seed's test rows (the same rows for every arm) and "
                      "averages the seeds' resampled means; seed_ci95: Student-t over the "
                      "seeds' means",
            "cells": cells, "runs": runs, "findings": findings(cells),
            # per arm: the base model's picks and the fine-tune's are different questions
            **({"guard_margins": {arm: margin_outcomes([e for e in guard_entries
                                                        if e["arm"] == arm])
                                  for arm in dict.fromkeys(e["arm"] for e in guard_entries)}}
               if guard_entries else {})}


def _cell(point: dict[str, Any], resamples: int, seed: int) -> dict[str, Any]:
    found = point["found"]
    out = {"cell": point["cell"], "values": point["values"], "seeds": [s for s, _ in found]}
    if not found:
        return {**out, "status": "not finished", "arms": {}, "effects": {}}
    # only arms every finished seed scored: the pairing holds within each seed
    arms = [a for a in found[0][1]["scores"] if all(a in f["scores"] for _, f in found)]
    summary = study_cell([{a: f["scores"][a] for a in arms} for _, f in found], resamples, seed)
    reasons = [f["not_comparable"] for _, f in found if f["not_comparable"]]
    for name in NOT_COMPARABLE:
        if reasons and name in summary["effects"]:
            summary["effects"][name] = {
                "value": None, "ci95": None, "excludes_zero": None, "comparable": False,
                "definition": summary["effects"][name]["definition"], "reason": reasons[0]}
    return {**out, "status": "finished", **summary}


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def verdict(name: str, entry: Mapping[str, Any]) -> str:
    """One effect in words: its value, interval and whether the interval excludes 0."""
    if entry.get("comparable") is False:
        return f"{name}: not comparable ({entry['reason']})"
    lo, hi = entry["ci95"]
    said = ("excludes 0: a real positive effect" if lo > 0 else
            "excludes 0: a real negative effect" if hi < 0 else
            "includes 0: not distinguishable from no effect")
    return (f"{name} {_points(entry['value'])} points, 95% CI [{_points(lo)}, {_points(hi)}]: "
            f"the interval {said}")


def findings(cells: list[dict[str, Any]]) -> list[str]:
    """Which effects' intervals exclude 0, cell by cell, in plain sentences."""
    lines = []
    for cell in cells:
        if cell["status"] != "finished":
            lines.append(f"{cell['cell']}: not finished, no result")
            continue
        seeds = len(cell["seeds"])
        for name in ("synergy", "interaction"):
            if name in cell["effects"]:
                lines.append(f"{cell['cell']} ({seeds} seed{'s' * (seeds != 1)}): "
                             + verdict(name, cell["effects"][name]))
    return lines
