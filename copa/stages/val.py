"""The arms on the val split, and the best arm on val: what `copa.load(run, arm="best")` and
`copa export` use. The test split only reports; it never chooses.

The optimize stage already scored most arms on val: its "plain" candidate is the plain program
(baseline on the base model, fine-tune-only on the merged one) and its winner is the program it
kept (prompt-only, combined). The evaluate stage scores whatever it did not (optimization off,
the guard off, an arm left out of optimization) and records all of them in report.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from copa.data.demos import RETRIEVED_MARK
from copa.registry import ARMS, DEMO_ARM

ARM_ORDER = tuple(ARMS)  # best_arm's tie order: the later arm has had more task-specific work
# Which optimize.json entry knows an arm's val score: (entry, candidate; None = its winner).
_FROM_OPTIMIZE = {"baseline": ("prompt_only", "plain"), "prompt_only": ("prompt_only", None),
                  "finetune_only": ("combined", "plain"), "combined": ("combined", None)}


def val_scores_from_optimize(optimize_info: Mapping[str, Any],
                             plain_model: bool = False) -> dict[str, float]:
    """The arms' val scores the optimize stage recorded (optimize.json), by arm. With
    plain_model (a demo-free fine-tune beside the demo-trained one), the combined arm's plain
    candidate ran on the demo-trained model: it is demo_finetune's score, not fine-tune-only's."""
    known: dict[str, float] = {}
    table = dict(_FROM_OPTIMIZE)
    if plain_model:
        table[DEMO_ARM] = table.pop("finetune_only")
    for arm, (entry, candidate) in table.items():
        info = optimize_info.get(entry) or {}
        scores = info.get("val_scores") or {}
        name = candidate or info.get("winner")
        if name in scores and scores[name] is not None:
            known[arm] = float(scores[name])
    return known


def demo_count(program_state: Mapping[str, Any]) -> int:
    """Demos in a program saved with DSPy's save (one entry per predictor); a retrieved-demos
    program shows k per predictor and call."""
    predictors = [p for name, p in program_state.items()
                  if isinstance(p, dict) and name != RETRIEVED_MARK and "demos" in p]
    retrieved = program_state.get(RETRIEVED_MARK) or {}
    return (sum(len(p.get("demos") or []) for p in predictors)
            + len(predictors) * int(retrieved.get("k", 0)))


def best_arm(val: Mapping[str, float | None], demos: Mapping[str, int] | None = None) -> str:
    """The arm with the highest val score. Ties go to the shorter prompt (fewer demos: every
    call is cheaper, as the prompt search's own ties do), then to the arm later in
    baseline, prompt_only, finetune_only, combined (val cannot separate them; the later arm
    has had the more task-specific work)."""
    demos = demos or {}
    scored = [arm for arm, score in val.items() if score is not None]
    if not scored:
        raise ValueError("no arm has a val score")
    return max(scored, key=lambda arm: (val[arm], -demos.get(arm, 0),
                                        ARM_ORDER.index(arm) if arm in ARM_ORDER else -1))


def val_section(scores: Mapping[str, float | None], sources: Mapping[str, str], rows: int,
                demos: Mapping[str, int]) -> dict[str, Any]:
    """report.json's "val": every arm's val score, where it came from, and the best arm."""
    best = best_arm(scores, demos) if any(s is not None for s in scores.values()) else None
    return {"rows": rows, "scores": dict(scores), "from": dict(sources), "demos": dict(demos),
            "best_arm": best,
            "rule": "highest val score; ties: fewer demos, then the later arm"}


def guard_entry(info: Mapping[str, Any], kept: Sequence[float], pick: Sequence[float],
                plain: Sequence[float] | None, plain_arm: str, resamples: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """report.json's "guard" entry for one prompt-optimized arm: the val scores the guard chose
    on (plain vs the optimizer's pick), what it kept, and both programs' test scores with the
    paired difference pick - plain (plain: the same model prompted plainly, `plain_arm`)."""
    from copa.stats import paired_differences

    val = info.get("val_scores") or {}
    optimized = val.get("optimized")
    entry: dict[str, Any] = {
        "kept": info.get("winner"), "plain_arm": plain_arm,
        "val": {"plain": val.get("plain"), "pick": optimized},
        "val_gain": None if optimized is None else optimized - val["plain"],
        "test": {"kept": _mean(kept), "pick": _mean(pick),
                 "plain": None if plain is None else _mean(plain)},
    }
    if plain is not None and len(plain) == len(pick) and pick:
        entry["test_gain"] = paired_differences({"pick": pick, "plain": plain}, "plain",
                                                resamples, seed)["pick"]
    return entry


def _mean(scores: Sequence[float]) -> float | None:
    return sum(scores) / len(scores) if scores else None


def margin_outcomes(entries: Sequence[Mapping[str, Any]],
                    margins: Sequence[float | None] = (None, 0.0, 0.02, 0.05, 0.1, 0.2)
                    ) -> list[dict[str, Any]]:
    """What each guard_margin would have done on recorded guard entries (one per cell and
    prompt-optimized arm, from report.json's "guard"): how often it keeps the pick, and the mean
    test gain over always keeping plain. The guard keeps the pick when its val gain is more
    than the margin (a tie keeps plain, as copa.dspy.search's guard does); margin None is the
    guard off (always the pick)."""
    usable = [e for e in entries
              if e.get("val_gain") is not None and (e.get("test") or {}).get("plain") is not None
              and e["test"].get("pick") is not None]
    out = []
    for margin in margins:
        keep = [margin is None or e["val_gain"] > margin + 1e-9 for e in usable]
        gains = [(e["test"]["pick"] - e["test"]["plain"]) if kept else 0.0
                 for e, kept in zip(usable, keep, strict=True)]
        out.append({"margin": margin, "entries": len(usable), "kept_pick": sum(keep),
                    "mean_test_gain": _mean(gains), "test_gains": gains})
    return out
