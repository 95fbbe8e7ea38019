"""Report files: report.json (data), report.md (the table), report.png (bars with 95% CIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from copa.backends.valcurve import curve_text
from copa.dspy.candidates import candidate_table, kept_demos_text
from copa.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from copa.pngfigure import png_bytes, pyplot
from copa.registry import ARMS, SINGLE_ARMS
from copa.stages import report_html
from copa.text import one_line

ARM_LABELS = {name: arm.label for name, arm in ARMS.items()}
# The report's table names each arm's model and prompt in columns of their own.
SHORT_LABELS = {name: arm.short for name, arm in ARMS.items()}
# For a report written before arms recorded their model and prompt.
_USED = {name: (arm.model, arm.prompt) for name, arm in ARMS.items()}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def guard_line(arm: str, entry: dict[str, Any]) -> str:
    """One line on what the val guard chose for an arm and what its pick scored on test."""
    val, test = entry["val"], entry["test"]
    gain = entry.get("test_gain")

    def _pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    shown = (f"; pick - plain on test {gain['value'] * 100:+.1f} "
             f"[{gain['ci95'][0] * 100:+.1f}, {gain['ci95'][1] * 100:+.1f}]" if gain else "")
    return (f"- Val guard ({arm}): plain {_pct(val['plain'])} vs the optimizer's pick "
            f"{_pct(val['pick'])} on val, kept **{entry['kept']}**; on test the pick scored "
            f"{_pct(test['pick'])} and the plain prompt ({entry['plain_arm']}) "
            f"{_pct(test['plain'])}{shown}")


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# copa report: {report['recipe']}", "",
             f"Metric: `{report['metric']}` on {report['test_rows']} held-out test rows "
             "(percent, with paired-bootstrap 95% CIs).", "",
             "| arm | model | prompt | score | 95% CI | n | failed calls |",
             "|---|---|---|---:|---:|---:|---:|"]
    for arm, data in report["arms"].items():
        errors = data.get("errors", 0)
        model, prompt = (data.get("model", _USED.get(arm, ("?", "?"))[0]),
                         data.get("prompt", _USED.get(arm, ("?", "?"))[1]))
        used = f"| {SHORT_LABELS.get(arm, arm)} | {model} | {prompt} "
        if data.get("failed"):  # every call failed: no score, never a 0.0
            lines.append(f"{used}| **failed** | — | {data['n']} | {errors} |")
            continue
        lo, hi = data["ci95"]
        lines.append(f"{used}| {_pct(data['score'])} | [{_pct(lo)}, {_pct(hi)}] | {data['n']} | "
                     f"{errors} |")
    lines.append("")
    for arm, data in report["arms"].items():
        if data.get("failed"):
            lines.append(f"- **{arm} failed**: all {data['n']} of its calls failed (first: "
                         f"{data.get('first_error')}); it has no score, and no synergy or gain "
                         "is computed from it")
        elif data.get("errors"):
            lines.append(f"- {arm}: {data['errors']} of {data['n']} calls failed and score 0 "
                         "(within evaluate.max_errors)")
    if "finetune_gain" in report:
        gain = report["finetune_gain"]
        lines.append(f"- Fine-tune gain (fine-tune-only − baseline): {_pct(gain['value'])} "
                     f"points, 95% CI [{_pct(gain['ci95'][0])}, {_pct(gain['ci95'][1])}]")
    syn = report.get("synergy")
    if syn is not None and syn.get("value") is not None:
        lo, hi = syn["ci95"]
        singles = [SHORT_LABELS[a] for a in SINGLE_ARMS
                   if a in report["arms"]]
        verdict = ("combined beats the best single-lever arm" if lo > 0 else
                   "combined is worse than the best single-lever arm" if hi < 0 else
                   "no significant synergy (CI includes 0)")
        lines.append(f"- **Synergy** (combined − max({', '.join(singles)})): "
                     f"{_pct(syn['value'])} points, 95% CI [{_pct(lo)}, {_pct(hi)}]: {verdict}")
    for arm, info in report.get("prompt_optimization", {}).items():
        if info.get("strategy"):  # BetterTogether's arm: its own candidate list
            lines.extend(strategy_lines(arm, info))
            continue
        scores = ", ".join(f"{k} {_pct(v)}" for k, v in info.get("val_scores", {}).items())
        offered = info.get("optimized_demos")
        offered = f"; the optimizer's pick had {offered} demos" if offered is not None else ""
        margin = report.get("settings", {}).get("guard_margin") or 0
        needed = (f"; to be kept, a candidate had to beat plain by more than {_pct(margin)} "
                  "(guard_margin)" if margin and scores else "")
        lines.append(f"- Prompt stage for {arm}: kept **{info.get('winner')}** "
                     f"({info.get('demos', 0)} demos{offered}); val: {scores or 'not compared'}"
                     + needed)
        retrieved = info.get("retrieved") if info.get("winner") == "optimized" else None
        for view in info.get("kept") or []:
            demos = kept_demos_text(view, retrieved)
            lines.append(f"  - instruction kept ({view['predictor']}): "
                         f"\"{one_line(view['instructions'])}\"; {demos}")
            for demo in view["demos"]:
                shown = "; ".join(f"{k}: {one_line(v)}" for k, v in demo.items())
                lines.append(f"    - demo: {shown}")
        pick = info.get("optimizer_pick") or []
        kept = info.get("kept") or []
        for view, mine in zip(pick, kept):
            if view["instructions"] != mine["instructions"]:
                lines.append(f"  - the optimizer proposed ({view['predictor']}): "
                             f"\"{one_line(view['instructions'])}\"")
        table = candidate_table(info.get("candidates") or [])
        if table:
            lines.append(f"  - every candidate the optimizer scored on val "
                         f"({len(info['candidates'])}):")
            lines += ["", *(f"    {row}" for row in table), ""]
        failed = {k: v for k, v in info.get("val_errors", {}).items() if v}
        if failed or info.get("lm_errors"):
            lines.append(f"  - failed calls: {info.get('lm_errors', 0)} while optimizing; on val "
                         + (", ".join(f"{k} {v}" for k, v in failed.items()) or "none"))
    val = report.get("val") or {}
    if val.get("scores"):
        shown = ", ".join(f"{arm} {'failed' if s is None else _pct(s)}"
                          for arm, s in val["scores"].items())
        lines.append(f"- Val ({val['rows']} rows): {shown}; best arm on val: "
                     f"**{val.get('best_arm')}** (what `copa.load`, `copa serve` and "
                     "`copa export` use by default; the test split never chooses)")
    lines += [guard_line(arm, entry) for arm, entry in (report.get("guard") or {}).items()]
    if report.get("training_val"):  # finetune.eval: val measured while the model trained
        lines.append(f"- Fine-tuning: {curve_text(report['training_val'])} (val_curve.png)")
    retrieval = report.get("retrieval")
    if retrieval:
        lines.append(f"- Retrieval ({retrieval['retriever']}, {retrieval['passages']} passages): "
                     f"recall@{retrieval['k']} {_pct(retrieval['recall_at_k'])}, i.e. that share "
                     f"of the {retrieval['n']} test questions has a gold answer in its "
                     f"{retrieval['k']} retrieved passages")
    timed = [_arm_time(arm, report) for arm in report["arms"]]
    if any(timed):
        lines.append("- Evaluation wall time per arm: " + ", ".join(t for t in timed if t))
    stages = report.get("stage_seconds", {})
    if stages:
        lines.append("- Stage wall time: " + ", ".join(f"{k} {v:.0f}s"
                                                      for k, v in stages.items()))
    v = report.get("versions", {})
    lines.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines) + "\n"


def strategy_lines(arm: str, info: dict[str, Any]) -> list[str]:
    """An arm optimized by BetterTogether (optimize.strategy): every candidate it scored."""
    carried = info.get("training_rows_carried_demos")
    rows = "the program's demos" if carried else "no demos"
    lines = [f"- BetterTogether `{info.get('strategy')}` for {arm}: picked "
             f"**{info.get('winner')}** on val; the fine-tunes' training rows carried {rows} "
             f"(BootstrapFinetune exclude_demos={not carried})"]
    for candidate in info["candidates"]:
        score = candidate.get("val_score")
        shown = "n/a" if score is None else _pct(score)
        lines.append(f"  - candidate `{candidate['strategy']}`: val {shown}, "
                     f"{candidate.get('demos', 0)} demos, model {candidate.get('model')}")
    for job in info.get("finetunes") or []:
        lines.append(f"  - fine-tune {job['key']}: {job['rows']} rows on {job['base_model']}, "
                     + ("reused" if job.get("reused") else f"{job.get('seconds', 0):.0f}s"))
        if job.get("warning"):
            lines.append(f"    - **warning**: {job['warning']}")
    return lines
def _arm_time(arm: str, report: dict[str, Any]) -> str:
    """'arm 12s (30.5 generated tokens/s)'; '' for an arm reused from earlier predictions."""
    seconds = report.get("eval_seconds", {}).get(arm)
    if not seconds:
        return ""
    tokens = report.get("eval_tokens", {}).get(arm)
    rate = f" ({tokens / seconds:.1f} generated tokens/s)" if tokens else ""
    return f"{arm} {seconds:.0f}s{rate}"


def plot(report: dict[str, Any]) -> bytes:
    plt = pyplot()

    arms = [a for a, data in report["arms"].items() if not data.get("failed")]
    scores = [100 * report["arms"][a]["score"] for a in arms]
    lower = [s - 100 * report["arms"][a]["ci95"][0] for a, s in zip(arms, scores)]
    upper = [100 * report["arms"][a]["ci95"][1] - s for a, s in zip(arms, scores)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.bar([a.replace("_", "-") for a in arms], scores, yerr=[lower, upper], capsize=6,
           color=[report_html.ARM_COLORS.get(a, "#90a4ae") for a in arms])
    for i, s in enumerate(scores):
        ax.text(i, s + 1, f"{s:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{report['metric']} (%)")
    title = f"{report['recipe']}: four arms on {report['test_rows']} test rows (95% CI)"
    if report.get("synergy", {}).get("value") is not None:
        title += f"\nsynergy {100 * report['synergy']['value']:+.1f} points"
    ax.set_title(title, fontsize=10)
    return png_bytes(fig)


def plot_curve(report: dict[str, Any]) -> bytes:
    """finetune.eval's val score (and the training loss) by step, the best step marked."""
    plt = pyplot()

    curve = report["training_val"]
    points = curve["evaluations"]
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(steps, [100 * p["score"] for p in points], "o-", color="#ef6c00", label="val")
    if curve.get("best_step") is not None:
        ax.axvline(curve["best_step"], color="#9e9e9e", linestyle="--",
                   label=f"best (step {curve['best_step']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"val {curve['metric']} (%)")
    ax.set_ylim(0, 105)
    handles = ax.get_legend_handles_labels()
    losses = [(p["step"], p["loss"]) for p in points if p.get("loss") is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), "s:", color="#607d8b", markersize=3, label="training loss")
        twin.set_ylabel("training loss")
        more = twin.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, loc="upper left", fontsize=8)
    ax.set_title(f"{report['recipe']}: val during fine-tuning ({curve['rows']} rows)", fontsize=10)
    return png_bytes(fig)


def write_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    run_dir = Path(run_dir)
    paths = {"report_json": run_dir / "report.json", "report_md": run_dir / "report.md",
             "report_png": run_dir / "report.png", "report_html": run_dir / "report.html"}
    atomic_write_json(paths["report_json"], report, sort_keys=False)  # arms in table order
    atomic_write_text(paths["report_md"], markdown(report))
    atomic_write_bytes(paths["report_png"], plot(report))
    if report.get("training_val"):
        paths["val_curve_png"] = run_dir / "val_curve.png"
        atomic_write_bytes(paths["val_curve_png"], plot_curve(report))
    atomic_write_text(paths["report_html"], report_html.html(report, run_dir))
    return paths
