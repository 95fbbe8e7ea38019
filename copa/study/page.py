"""study.html: a study's one self-contained page (copa.htmlpage) from study.json's data: each
cell's arms (mean over seeds, pooled paired-bootstrap interval), the synergy and interaction with
their intervals, the findings, and every run (sortable)."""

from __future__ import annotations

from html import escape
from typing import Any

from copa.htmlpage import Bar, interval_chart, page, section, table
from copa.registry import ARMS

COLORS = {**{name: arm.color for name, arm in ARMS.items()}, "synergy": "#8e24aa",
          "interaction": "#e53935"}
EFFECTS = ("synergy", "interaction", "finetune_gain", "prompt_gain")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def html(data: dict[str, Any]) -> str:
    """study.html's text."""
    arms = data["arms"]
    cells = [c for c in data["cells"] if c["status"] == "finished"]
    arm_groups = [(c["cell"], [Bar(a, 100 * c["arms"][a]["mean"], 100 * c["arms"][a]["ci95"][0],
                                   100 * c["arms"][a]["ci95"][1], COLORS.get(a, "#90a4ae"))
                               if a in c["arms"] else Bar(a, None, color=COLORS.get(a, "#999"))
                               for a in arms]) for c in cells]
    extent, effect_groups = 5.0, []
    for c in cells:
        bars = []
        for name in ("synergy", "interaction"):
            entry = c["effects"].get(name)
            if not entry or entry.get("value") is None:
                bars.append(Bar(name, None, color=COLORS[name]))
                continue
            lo, hi = (100 * v for v in entry["ci95"])
            extent = max(extent, abs(lo), abs(hi))
            bars.append(Bar(name, 100 * entry["value"], lo, hi, COLORS[name]))
        effect_groups.append((c["cell"], bars))
    extent = min(100.0, 5 * (int(extent / 5) + 1))
    arm_rows = [[c["cell"], str(len(c["seeds"])),
                 *((f"{_pct(c['arms'][a]['mean'])}{_ci(c['arms'][a]['ci95'])}",
                    c["arms"][a]["mean"]) if a in c["arms"] else ("—", -1) for a in arms)]
                for c in data["cells"]]
    shown = [n for n in EFFECTS if any(n in c["effects"] for c in data["cells"])]
    effect_rows = []
    for c in data["cells"]:
        row: list[Any] = [c["cell"]]
        for name in shown:
            entry = c["effects"].get(name)
            if not entry or entry.get("value") is None:
                row.append(("not comparable" if entry else "—", -999))
                continue
            star = "*" if entry["excludes_zero"] else ""
            row.append((f"{100 * entry['value']:+.1f}{star}{_ci(entry['ci95'])}",
                        entry["value"]))
        effect_rows.append(row)
    run_rows = [[r["cell"], str(r["seed"]), r["status"], str(r.get("test_rows", "")),
                 *((_pct((r.get("scores") or {}).get(a)), (r.get("scores") or {}).get(a, -1))
                   for a in arms)] for r in data["runs"]]
    findings = "".join(f"<li>{escape(line)}</li>" for line in data["findings"])
    grid = ", ".join(f"{k} {v}" for k, v in data["grid"].items()) or "none"
    sections = [
        section("Arms: mean over seeds", interval_chart(arm_groups)
                + table(["cell", "seeds", *arms], arm_rows, ident="cells",
                        numeric=range(1, len(arms) + 2)),
                f"{data['metric']} in percent; 95% intervals: {data['method']}"),
        section("Synergy and interaction", interval_chart(effect_groups, -extent, extent, unit="",
                                                          bars=False)
                + table(["cell", *shown], effect_rows, ident="effects",
                        numeric=range(1, len(shown) + 1)),
                "points; * = the interval excludes 0"),
        section("Findings", f"<ul>{findings}</ul>"),
        section("Every run", table(["cell", "seed", "status", "test rows", *arms], run_rows,
                                   ident="runs", numeric=range(3, len(arms) + 4))),
    ]
    return page(f"copa study: {data['study']}", sections,
                f"recipe {data['recipe']}; grid {grid}; seeds {data['seeds']}; "
                f"{data['bootstrap']} resamples")
