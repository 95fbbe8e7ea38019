"""The arms on the val split, and the best arm on val: what `copa.load(run, arm="best")` and
`copa export` use. The test split only reports; it never chooses.

The optimize stage already scored most arms on val: its "plain" candidate is the plain program
(baseline on the base model, fine-tune-only on the merged one) and its winner is the program it
kept (prompt-only, combined). The evaluate stage scores whatever it did not (optimization off,
the guard off, an arm left out of optimization) and records all of them in report.json.
"""

from __future__ import annotations

from collections.abc import Mapping
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
