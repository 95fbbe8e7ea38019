"""A study's files: study.json (the data), study.md (tables and findings), study.html (the
same as one offline page, copa.study.page), study.png (arms
against a numeric grid axis with interval bands, a heatmap for two axes, else one point
and interval per cell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from copa.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from copa.pngfigure import png_bytes, pyplot
from copa.registry import ARMS
from copa.study import page

ARMS_SHOWN = {name: arm.short for name, arm in ARMS.items()}
COLORS = {"baseline": "#757575", "prompt_only": "#1e88e5", "finetune_only": "#fb8c00",
          "demo_finetune": "#6d4c41", "combined": "#43a047", "synergy": "#8e24aa",
          "interaction": "#e53935"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "—" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def markdown(data: dict[str, Any]) -> str:
    arms = data["arms"]
    lines = [f"# copa study: {data['study']}", "",
             f"Base recipe `{data['recipe']}`; grid "
             + (", ".join(f"`{k}` {v}" for k, v in data["grid"].items()) or "none")
             + f"; seeds {data['seeds']}; metric `{data['metric']}` (percent).", "",
             f"Method: {data['method']} ({data['bootstrap']} resamples).", "",
             "## Arms: mean over seeds [95% CI]", "",
             "| cell | seeds | " + " | ".join(ARMS_SHOWN[a] for a in arms) + " |",
             "|---|---:|" + "---:|" * len(arms)]
    for cell in data["cells"]:
        shown = [f"{_pct(cell['arms'][a]['mean'])} {_ci(cell['arms'][a]['ci95'])}"
                 if a in cell["arms"] else "—" for a in arms]
        lines.append(f"| {cell['cell']} | {len(cell['seeds'])} | " + " | ".join(shown) + " |")
    effects = [n for n in ("synergy", "interaction", "finetune_gain", "prompt_gain")
               if any(n in c["effects"] for c in data["cells"])]
    if effects:
        lines += ["", "## Effects, points [95% CI] (* = the interval excludes 0)", "",
                  "| cell | " + " | ".join(effects) + " |", "|---|" + "---:|" * len(effects)]
        for cell in data["cells"]:
            shown = []
            for name in effects:
                entry = cell["effects"].get(name)
                if entry is None or entry.get("value") is None:
                    shown.append("not comparable" if entry else "—")
                    continue
                star = "*" if entry["excludes_zero"] else ""
                shown.append(f"{100 * entry['value']:+.1f}{star} {_ci(entry['ci95'])}")
            lines.append(f"| {cell['cell']} | " + " | ".join(shown) + " |")
        lines += ["", "Synergy: combined − max(every single-lever arm: prompt-only, fine-tune-only "
                  "and, where the fine-tune saw demos, demo-aware fine-tune only). Interaction: "
                  "combined − fine-tune-only − prompt-only + baseline (what the two together "
                  "add beyond the sum of their separate gains)."]
    if data.get("guard_margins"):
        lines += ["", "## The val guard's margin", "",
                  "Per prompt-optimized arm, over the cells and seeds where the optimizer's pick "
                  "was scored on test (copa scores it when the guard declines it): what each "
                  "`optimize.guard_margin` would have kept (off: `guard: false`), and the mean "
                  "test gain over always keeping the plain prompt on that arm's model."]
        for arm, outcomes in data["guard_margins"].items():
            lines += ["", f"{ARMS[arm].short if arm in ARMS else arm}:", "",
                      "| guard_margin | kept the pick | mean test gain (points) |",
                      "|---:|---:|---:|"]
            lines += [f"| {'off' if o['margin'] is None else format(o['margin'], 'g')} | "
                      f"{o['kept_pick']} of {o['entries']} | "
                      f"{100 * o['mean_test_gain']:+.1f} |" for o in outcomes
                      if o["mean_test_gain"] is not None]
    lines += ["", "## Findings", "", *(f"- {line}" for line in data["findings"]),
              "", "## Every run", "",
              "| cell | seed | test rows | " + " | ".join(ARMS_SHOWN[a] for a in arms) + " |",
              "|---|---:|---:|" + "---:|" * len(arms)]
    for run in data["runs"]:
        scores = run.get("scores", {})
        if run["status"] != "finished":
            lines.append(f"| {run['cell']} | {run['seed']} | not finished |"
                         + " |" * len(arms))
            continue
        lines.append(f"| {run['cell']} | {run['seed']} | {run['test_rows']} | "
                     + " | ".join(_pct(scores.get(a)) for a in arms) + " |")
    return "\n".join(lines) + "\n"


def numeric_axis(data: dict[str, Any]) -> str | None:
    """The one grid key whose values are all numbers (what a line plot can take as x)."""
    keys = list(data["grid"])
    if len(keys) == 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              for v in data["grid"][keys[0]]):
        return keys[0]
    return None


def plot(data: dict[str, Any]) -> bytes:
    plt = pyplot()

    cells = [c for c in data["cells"] if c["status"] == "finished"]
    keys = list(data["grid"])
    axis = numeric_axis(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    metric = f"{data['metric']} (%)"
    if len(keys) == 2 and cells:
        _heatmaps(fig, left, right, data, cells, keys)
    else:
        x = ([c["values"][axis] for c in cells] if axis else list(range(len(cells))))
        n = len(data["arms"])
        for i, arm in enumerate(data["arms"]):
            _series(left, axis is not None, x, [c["arms"].get(arm) for c in cells],
                    ARMS_SHOWN[arm], COLORS[arm], place=_shift(i, n))
        for i, name in enumerate(("synergy", "interaction")):
            _series(right, axis is not None, x, [c["effects"].get(name) for c in cells], name,
                    COLORS[name], key="value", place=_shift(i, 2))
        right.axhline(0, color="black", linewidth=0.8)
        for ax in (left, right):
            ax.set_xlabel(axis or "cell")
            if not axis:
                ax.set_xticks(x, [c["cell"] for c in cells], rotation=20, fontsize=8)
            ax.legend(fontsize=8)
        left.set_ylabel(metric)
        left.set_ylim(0, 105)
        right.set_ylabel("points")
        shown = "95% CI band" if axis else "95% CI"
        left.set_title(f"arms: mean over seeds, {shown}", fontsize=10)
        right.set_title(f"synergy and interaction, {shown}", fontsize=10)
    fig.suptitle(f"copa study {data['study']}: {len(data['seeds'])} seeds", fontsize=11)
    return png_bytes(fig)


def _present(x: list[Any], entries: list[dict[str, Any] | None], key: str
             ) -> list[tuple[Any, dict[str, Any]]]:
    return [(xi, e) for xi, e in zip(x, entries) if e and e.get(key) is not None]


def _shift(i: int, n: int) -> float:
    """Side-by-side places for n series at one categorical x (equal values stay visible)."""
    return (i - (n - 1) / 2) * 0.08


def _series(ax: Any, numeric: bool, x: list[Any], entries: list[dict[str, Any] | None],
            label: str, color: str, key: str = "mean", place: float = 0.0) -> None:
    if numeric:
        _band(ax, x, entries, label, color, key)
    else:
        _whiskers(ax, [xi + place for xi in x], entries, label, color, key)


def _band(ax: Any, x: list[Any], entries: list[dict[str, Any] | None], label: str,
          color: str, key: str = "mean") -> None:
    """A numeric axis: a line through the points and the interval as a band."""
    points = _present(x, entries, key)
    if not points:
        return
    xs = [p[0] for p in points]
    ax.plot(xs, [100 * e[key] for _, e in points], marker="o", color=color, label=label)
    ax.fill_between(xs, [100 * e["ci95"][0] for _, e in points],
                    [100 * e["ci95"][1] for _, e in points], color=color, alpha=0.15)


def _whiskers(ax: Any, x: list[Any], entries: list[dict[str, Any] | None], label: str,
              color: str, key: str = "mean") -> None:
    """Unordered cells (e.g. strategies): a point and its interval per cell, no line between
    them (the caller places each series a little aside, so equal values stay visible)."""
    points = _present(x, entries, key)
    if not points:
        return
    values = [100 * e[key] for _, e in points]
    # a percentile interval need not hold its point estimate: no negative whisker lengths
    low = [max(0.0, v - 100 * e["ci95"][0]) for v, (_, e) in zip(values, points)]
    high = [max(0.0, 100 * e["ci95"][1] - v) for v, (_, e) in zip(values, points)]
    ax.errorbar([p[0] for p in points], values, yerr=[low, high], fmt="o",
                color=color, capsize=3, label=label)


def _heatmaps(fig: Any, left: Any, right: Any, data: dict[str, Any], cells: list[dict],
              keys: list[str]) -> None:
    """Two grid axes: the combined arm (or the last arm run) and the interaction, per point."""
    import numpy as np

    rows, cols = data["grid"][keys[0]], data["grid"][keys[1]]
    arm = "combined" if "combined" in data["arms"] else data["arms"][-1]
    panels = [(left, f"{ARMS_SHOWN[arm]} (%)", lambda c: (c["arms"].get(arm) or {}).get("mean")),
              (right, "interaction (points)",
               lambda c: (c["effects"].get("interaction") or {}).get("value"))]
    for ax, title, value in panels:
        grid = np.full((len(rows), len(cols)), np.nan)
        for cell in cells:
            v = value(cell)
            if v is not None:
                grid[rows.index(cell["values"][keys[0]]), cols.index(cell["values"][keys[1]])] = \
                    100 * v
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_ylabel(keys[0])
        ax.set_xlabel(keys[1])
        ax.set_title(title, fontsize=10)


def write_study(study_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    study_dir = Path(study_dir)
    paths = {"json": study_dir / "study.json", "md": study_dir / "study.md",
             "png": study_dir / "study.png", "html": study_dir / "study.html"}
    atomic_write_json(paths["json"], data, sort_keys=False)
    atomic_write_text(paths["md"], markdown(data))
    atomic_write_bytes(paths["png"], plot(data))
    atomic_write_text(paths["html"], page.html(data))
    return paths
