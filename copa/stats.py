"""Paired bootstrap intervals for the four-arm table (numpy, vectorised over resamples).

Every arm is scored on the same test rows, so one set of resampled row indices serves all arms:
differences between arms (synergy, fine-tune gain) get intervals from the same resamples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from copa.registry import SINGLE_ARMS


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


# The effects of the 2x2 design (the four arms), each a function of the arms' means; a run's
# report gives REPORT_EFFECTS, a study all of them.
# Synergy is against the best of the arms that pull one lever (weights or prompt):
# copa.registry.SINGLE_ARMS (demo_finetune, a fine-tune trained with demos and prompted
# plainly, is one where a run has it).
EFFECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "synergy": ("combined - max(every single-lever arm: prompt_only, finetune_only and, where "
                "reported, demo_finetune)", ("combined", "finetune_only", "prompt_only")),
    "interaction": ("combined - finetune_only - prompt_only + baseline",
                    ("combined", "finetune_only", "prompt_only", "baseline")),
    "finetune_gain": ("finetune_only - baseline", ("finetune_only", "baseline")),
    "prompt_gain": ("prompt_only - baseline", ("prompt_only", "baseline")),
}


def effect(name: str, means: Mapping[str, Any]) -> Any:
    """An effect from the arms' means (floats, or arrays of resampled means)."""
    m = means
    if name == "synergy":
        return m["combined"] - np.maximum.reduce([m[a] for a in SINGLE_ARMS if a in m])
    if name == "interaction":
        return m["combined"] - m["finetune_only"] - m["prompt_only"] + m["baseline"]
    if name == "finetune_gain":
        return m["finetune_only"] - m["baseline"]
    if name == "prompt_gain":
        return m["prompt_only"] - m["baseline"]
    raise ValueError(name)


REPORT_EFFECTS = ("synergy", "finetune_gain")


def paired_bootstrap(per_arm: Mapping[str, Sequence[float]], resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """CIs of each arm's mean and of differences, resampling the same test rows for every arm.

    synergy = combined - max(single-lever arms); its CI uses the same resamples.
    """
    means = resampled_means(per_arm, resamples, seed)
    result: dict[str, Any] = {"arms": {a: _interval(m, level) for a, m in means.items()}}
    for name in REPORT_EFFECTS:
        if all(a in means for a in EFFECTS[name][1]):
            result[name] = _interval(effect(name, means), level)
    return result


def summarize(per_arm: Mapping[str, Sequence[float]], resamples: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Scores, CIs and synergy as plain data (the core of report.json)."""
    cis = paired_bootstrap(per_arm, resamples, seed)
    arms = {a: {"score": float(np.mean(s)) if len(s) else 0.0, "n": len(s),
                "ci95": cis["arms"][a]} for a, s in per_arm.items()}
    out: dict[str, Any] = {"arms": arms}
    scores = {a: entry["score"] for a, entry in arms.items()}
    for name in REPORT_EFFECTS:
        if name in cis:
            out[name] = {"value": float(effect(name, scores)), "ci95": cis[name],
                         "definition": EFFECTS[name][0]}
    return out


def paired_differences(per_run: Mapping[str, Sequence[float]], reference: str,
                       resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Each other run's mean minus the reference run's, on the same test rows (aligned by the
    caller), with a paired-bootstrap interval: the same resampled rows for every run, as the
    arms of one report (copa compare: "did my change help?")."""
    means = resampled_means(per_run, resamples, seed)
    point = {name: float(np.mean(scores)) if len(scores) else 0.0
             for name, scores in per_run.items()}
    out = {}
    for name in per_run:
        if name == reference:
            continue
        lo, hi = _interval(means[name] - means[reference], level)
        out[name] = {"value": point[name] - point[reference], "ci95": [lo, hi],
                     "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


# ---- studies: one recipe on several seeds ------------------------------------------------------

def pooled_resampled_means(per_seed: Sequence[Mapping[str, Sequence[float]]],
                           resamples: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """Each arm's mean over seeds, per bootstrap resample. Within a seed the test rows are
    resampled, the same rows for every arm (paired: the arms of one run saw the same rows);
    rows never move between seeds (each seed has its own split and model); the seeds'
    resampled means are then averaged, as the point estimate averages them."""
    arms = [a for a in per_seed[0] if all(a in scores for scores in per_seed)]
    total = {a: np.zeros(resamples) for a in arms}
    for i, scores in enumerate(per_seed):
        means = resampled_means({a: scores[a] for a in arms}, resamples, seed + i)
        for a in arms:
            total[a] += means[a]
    return {a: total[a] / len(per_seed) for a in arms}


def seed_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Student-t interval of a mean over seeds (the spread between seeds: split, training and
    optimizer randomness); None for one seed."""
    if len(values) < 2:
        return None
    from scipy import stats as scipy_stats  # only here: copa.stats otherwise needs numpy alone

    x = np.asarray(values, dtype=float)
    half = float(scipy_stats.t.ppf((1 + level) / 2, len(x) - 1)) * x.std(ddof=1) / np.sqrt(len(x))
    return [float(x.mean() - half), float(x.mean() + half)]


def study_cell(per_seed: Sequence[Mapping[str, Sequence[float]]], resamples: int = 2000,
               seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """One study cell: per arm the mean over seeds with its pooled paired-bootstrap interval
    (and the seeds' own t interval); per effect of EFFECTS whose arms are all there, its value,
    interval, per-seed values and whether the interval excludes 0."""
    draws = pooled_resampled_means(per_seed, resamples, seed)
    seed_means = [{a: float(np.mean(s[a])) for a in draws} for s in per_seed]
    means = {a: float(np.mean([m[a] for m in seed_means])) for a in draws}
    arms = {a: {"mean": means[a], "ci95": _interval(draws[a], level),
                "seeds": [m[a] for m in seed_means],
                "seed_ci95": seed_interval([m[a] for m in seed_means], level)} for a in draws}
    effects = {}
    for name, (definition, needs) in EFFECTS.items():
        if not all(a in draws for a in needs):
            continue
        lo, hi = _interval(effect(name, draws), level)
        effects[name] = {"value": float(effect(name, means)), "ci95": [lo, hi],
                         "seeds": [float(effect(name, m)) for m in seed_means],
                         "excludes_zero": bool(lo > 0 or hi < 0), "definition": definition}
    return {"arms": arms, "effects": effects,
            "test_rows": [len(next(iter(s.values()))) for s in per_seed]}
