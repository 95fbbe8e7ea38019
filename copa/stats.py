"""Paired bootstrap intervals for the four-arm table (numpy, vectorised over resamples).

Every arm is scored on the same test rows, so one set of resampled row indices serves all arms:
differences between arms (synergy, fine-tune gain) get intervals from the same resamples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _interval(draws: np.ndarray, level: float) -> list[float]:
    """Percentile interval of bootstrap draws."""
    if draws.size == 0:
        return [0.0, 0.0]
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], method="lower")
    return [float(lo), float(hi)]


def resampled_means(per_arm: Mapping[str, Sequence[float]], resamples: int = 1000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Each arm's mean over the same `resamples` bootstrap resamples of the test rows."""
    if not per_arm:
        return {}
    scores = np.array([list(s) for s in per_arm.values()], dtype=float)  # [arms, rows]
    n = scores.shape[1]
    if n == 0:
        return {arm: np.empty(0) for arm in per_arm}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = scores[:, idx].mean(axis=2)  # [arms, resamples]
    return dict(zip(per_arm, means, strict=True))


def bootstrap_ci(scores: Sequence[float], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of one mean."""
    lo, hi = _interval(resampled_means({"x": scores}, resamples, seed)["x"], level)
    return (lo, hi)


def paired_bootstrap(per_arm: Mapping[str, Sequence[float]], resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """CIs of each arm's mean and of differences, resampling the same test rows for every arm.

    synergy = combined - max(finetune_only, prompt_only); its CI uses the same resamples.
    """
    means = resampled_means(per_arm, resamples, seed)
    result: dict[str, Any] = {"arms": {a: _interval(m, level) for a, m in means.items()}}
    if all(a in means for a in ("combined", "finetune_only", "prompt_only")):
        synergy = means["combined"] - np.maximum(means["finetune_only"], means["prompt_only"])
        result["synergy"] = _interval(synergy, level)
    if "finetune_only" in means and "baseline" in means:
        result["finetune_gain"] = _interval(means["finetune_only"] - means["baseline"], level)
    return result


def summarize(per_arm: Mapping[str, Sequence[float]], resamples: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Scores, CIs and synergy as plain data (the core of report.json)."""
    cis = paired_bootstrap(per_arm, resamples, seed)
    arms = {a: {"score": float(np.mean(s)) if len(s) else 0.0, "n": len(s),
                "ci95": cis["arms"][a]} for a, s in per_arm.items()}
    out: dict[str, Any] = {"arms": arms}
    if "synergy" in cis:
        best_single = max(arms["finetune_only"]["score"], arms["prompt_only"]["score"])
        out["synergy"] = {"value": arms["combined"]["score"] - best_single,
                          "ci95": cis["synergy"],
                          "definition": "combined - max(finetune_only, prompt_only)"}
    if "finetune_gain" in cis:
        out["finetune_gain"] = {
            "value": arms["finetune_only"]["score"] - arms["baseline"]["score"],
            "ci95": cis["finetune_gain"], "definition": "finetune_only - baseline"}
    return out


def not_comparable(entry: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """A difference (synergy) whose arms were not prompted as they were trained: no value, no
    interval, so no report can print one as a result; the reason says why."""
    return {"value": None, "ci95": None, "definition": entry.get("definition"),
            "comparable": False, "reason": reason}
