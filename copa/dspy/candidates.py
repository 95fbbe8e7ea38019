"""What an optimizer tried: every candidate program it scored, with its score, as the optimizers
attach them to the program they return (BootstrapFewShotWithRandomSearch and MIPROv2:
`candidate_programs`; GEPA with `track_stats`: `detailed_results`), read into plain rows for
optimize.json, the report and `copa optimize`'s output.

Scores are fractions in [0, 1] like copa's own val scores: DSPy's Evaluate reports percent
(random search, MIPROv2), GEPA its metric's mean.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from copa.text import one_line

if TYPE_CHECKING:  # the report formats candidates without loading DSPy
    import dspy


def _instructions(program: dspy.Module) -> list[str]:
    return [predictor.signature.instructions for predictor in program.predictors()]


def _demos(program: dspy.Module) -> int:
    return sum(len(predictor.demos) for predictor in program.predictors())


def _row(source: str, score: float | None, program: dspy.Module) -> dict[str, Any]:
    return {"source": source, "val_score": None if score is None else round(float(score), 4),
            "demos": _demos(program), "instructions": _instructions(program)}


def optimizer_candidates(optimized: dspy.Module | None) -> list[dict[str, Any]]:
    """The candidates the optimizer scored on val, best first; [] for an optimizer that keeps
    no record (BootstrapFewShot, COPRO, a user's own)."""
    if optimized is None:
        return []
    rows: list[dict[str, Any]] = []
    details = getattr(optimized, "detailed_results", None)
    if details is not None:  # GEPA: candidate i, its parents, its aggregate val score
        for i, (program, score) in enumerate(zip(details.candidates,
                                                 details.val_aggregate_scores)):
            parents = [p for p in (details.parents[i] or []) if p is not None]
            lineage = f" (from {', '.join(map(str, parents))})" if parents else " (seed)"
            rows.append(_row(f"GEPA candidate {i}{lineage}", score, program))
    for entry in getattr(optimized, "candidate_programs", None) or []:
        if "full_eval" in entry:  # MIPROv2: full val evaluations only (not minibatches)
            source = "MIPROv2 full evaluation"
        else:  # random search: seed -3 zero-shot, -2 labeled only, -1 unshuffled, else random
            source = f"random search seed {entry.get('seed')}"
        rows.append(_row(source, entry["score"] / 100.0, entry["program"]))
    return sorted(rows, key=lambda r: -1.0 if r["val_score"] is None else r["val_score"],
                  reverse=True)


def optimizer_log_params(accepted: Any, log_dir: Path | None) -> dict[str, Any]:
    """Constructor arguments that make an optimizer keep its record: GEPA's candidates
    (track_stats) and, for optimizers that take a log_dir (MIPROv2, GEPA), their files in the
    run directory. The folder is emptied first: GEPA resumes from whatever state a log_dir
    holds, and a stage that re-runs has changed inputs."""
    params: dict[str, Any] = {}
    if "track_stats" in accepted:
        params["track_stats"] = True
    if log_dir is not None and "log_dir" in accepted:
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True)
        params["log_dir"] = str(log_dir)
    return params


def candidate_table(rows: list[dict[str, Any]]) -> list[str]:
    """The candidates as a Markdown table (the report and `copa optimize` print the same)."""
    if not rows:
        return []
    lines = ["| candidate | val | demos | instruction |", "|---|---:|---:|---|"]
    for row in rows:
        score = "—" if row["val_score"] is None else f"{100 * row['val_score']:.1f}"
        text = " / ".join(one_line(i, 120) for i in row["instructions"]).replace("|", "\\|")
        lines.append(f"| {row['source']} | {score} | {row['demos']} | {text} |")
    return lines


def kept_demos_text(view: dict[str, Any], retrieved: dict[str, Any] | None) -> str:
    """How many demos a kept program shows its model: its own, or (a retrieved-demos program,
    which holds none of its own) k chosen per input. For the optimize stage's log and the report."""
    if retrieved:
        return f"{retrieved['k']} demos chosen per input ({retrieved['by']})"
    return f"{len(view['demos'])} demos"
