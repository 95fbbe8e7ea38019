"""The model card (README.md) of an exported folder: task, data, the four arms on test with their
intervals, which arm this is and why, how it was trained, licenses, and how to serve it."""

from __future__ import annotations

import re
from typing import Any

from copa.models import EMBEDDED
from copa.registry import ARMS, OPTIMIZED_ARMS
from copa.use.bundle import Bundle

# Licenses copa knows for what it ships or names; anything else the card says to check.
KNOWN_MODEL_LICENSES = {alias: model.license for alias, model in EMBEDDED.items()}
KNOWN_DATA_LICENSES = {
    "sklearn:iris": "Iris (R. A. Fisher, 1936), UCI Machine Learning Repository, CC BY 4.0; "
                    "read from the copy scikit-learn ships (BSD-3-Clause)"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def model_license(recipe: Any) -> tuple[str, str]:
    """The base model's license (identifier, sentence): known for copa's built-in model, else
    the `license:` line of the model folder's own card, else "other" and a note to check it."""
    base = recipe.model.base
    if base in KNOWN_MODEL_LICENSES:
        return KNOWN_MODEL_LICENSES[base]
    card = recipe.resolve(base) / "README.md"
    if card.is_file():
        found = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.M)
        if found:
            return found.group(1), f"{found.group(1)} (from {base}'s model card)"
    return "other", f"not recorded: check the license of {base} before sharing this model"


def data_license(recipe: Any) -> str:
    source = recipe.data.source
    if source in KNOWN_DATA_LICENSES:
        return KNOWN_DATA_LICENSES[source]
    if source.startswith("hf:"):
        return f"see the card of the data set {source[3:]}"
    return f"your data ({source}): state its license before sharing"


def _results(report: dict[str, Any] | None, arm: str) -> list[str]:
    if not report or not report.get("arms"):
        return ["No report was recorded with this run."]
    lines = [f"Metric `{report['metric']}` on {report['test_rows']} held-out test rows "
             "(percent, paired-bootstrap 95% CIs). This folder holds the **bolded** arm.", "",
             "| arm | test score | 95% CI |", "|---|---:|---:|"]
    for name, data in report["arms"].items():
        label = ARMS[name].label if name in ARMS else name
        label = f"**{label}**" if name == arm else label
        if data.get("failed"):
            lines.append(f"| {label} | failed | — |")
            continue
        lo, hi = data["ci95"]
        lines.append(f"| {label} | {_pct(data['score'])} | [{_pct(lo)}, {_pct(hi)}] |")
    for key, title in (("finetune_gain", "Fine-tune gain"), ("synergy", "Synergy")):
        entry = report.get(key)
        if entry and entry.get("value") is not None and entry.get("comparable") is not False:
            lo, hi = entry["ci95"]
            lines.append(f"\n{title} ({entry.get('definition', '')}): {_pct(entry['value'])} "
                         f"points, 95% CI [{_pct(lo)}, {_pct(hi)}].")
    return lines


def _why(bundle: Bundle) -> str:
    scores = bundle.val.get("scores") or {}
    if not scores:
        return f"This is the **{bundle.arm}** arm, chosen by name."
    shown = ", ".join(f"{a} {_pct(s)}" for a, s in scores.items())
    chosen = ("the best on the val split" if bundle.val.get("best_arm") == bundle.arm
              else "chosen by name")
    return (f"This is the **{bundle.arm}** arm, {chosen} (val scores: {shown}); the test split "
            "only reports, it never chooses.")


def _adapter(bundle: Bundle) -> str:
    """The adapter training used: the rendered Axolotl config says what 'auto' became."""
    from copa.runs import TRAIN_CONFIG

    adapter = bundle.recipe.finetune.adapter
    config = bundle.root / "rendered" / TRAIN_CONFIG
    if adapter == "auto" and bundle.kind == "run" and config.is_file():
        import yaml

        rendered = yaml.safe_load(config.read_text()) or {}
        adapter = str(rendered.get("adapter") or adapter)
    return {"lora": "LoRA", "qlora": "QLoRA (4-bit)"}.get(adapter, "LoRA (QLoRA on CUDA)")


def _training(bundle: Bundle, report: dict[str, Any] | None) -> list[str]:
    recipe = bundle.recipe
    ft, opt = recipe.finetune, recipe.optimize
    lines = [f"- Base model: `{recipe.model.base}`."]
    if bundle.model_role == "merged":
        length = f"{ft.max_steps} steps" if ft.max_steps else f"{ft.num_epochs} epochs"
        lines.append(f"- Fine-tuned with Axolotl: {_adapter(bundle)} (r={ft.lora_r}, "
                     f"alpha={ft.lora_alpha}, dropout {ft.lora_dropout}), {length}, learning "
                     f"rate {ft.learning_rate} ({ft.lr_scheduler}), micro-batch "
                     f"{ft.micro_batch_size}, seed {ft.seed}; merged into the weights in "
                     "`model/`.")
    else:
        lines.append("- Not fine-tuned: `model/` is the base model.")
    if bundle.arm in OPTIMIZED_ARMS:
        lines.append(f"- Prompt: DSPy `{opt.optimizer}` searched instructions and demos; the "
                     "program kept (the best on val, the plain one included) is `program.json`.")
    else:
        lines.append("- Prompt: the plain program (the recipe's instructions, no demos), saved "
                     "as `program.json`.")
    versions = (report or {}).get("versions")
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    return lines


def model_card(bundle: Bundle, folder_name: str) -> str:
    recipe = bundle.recipe
    task = recipe.task
    example = ", ".join(f'"{f}": "..."' for f in task.input_fields)
    splits = recipe.data.splits
    license_id, license_text = model_license(recipe)
    front = ["---", f"license: {license_id}",
             f"base_model: {recipe.model.base}", "tags: [copa, dspy, axolotl]", "---", ""]
    lines = [
        *front, f"# {recipe.name}: `{task.signature}`", "",
        task.instructions or "", "",
        "Made by copa from one recipe (`recipe.yaml`): a model fine-tuned "
        "for this task and the prompt program that goes with it. " + _why(bundle), "",
        "## Use it", "",
        "```bash",
        f"copa serve {folder_name}            # http://127.0.0.1:8000, docs at /docs",
        "curl -s http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\",
        f"     -d '{{{example}}}'",
        f"copa predict {folder_name} --input rows.csv -o predictions.jsonl",
        "```", "",
        "```python",
        "import copa",
        f'program = copa.load("{folder_name}")',
        f"print(program({', '.join(f'{f}=...' for f in task.input_fields)})."
        f"{task.output_fields[-1]})",
        "```", "",
        "The prompt must be formatted with `template.jinja` (the format the model was trained "
        "on) and the instructions and demos in `program.json`; copa's template adapter does "
        "both. To run the model on another server (e.g. `vllm serve model/`), set "
        "`serve: {engine: openai, api_base: http://HOST:PORT/v1, model: <its id>}` in "
        "`recipe.yaml` and keep using `copa serve` / `copa.load` for the prompts; "
        "`serve.engine: vllm` makes copa start vLLM itself.", "",
        "## Task", "",
        f"- Inputs: {', '.join(f'`{f}`' for f in task.input_fields)}; outputs: "
        f"{', '.join(f'`{f}`' for f in bundle.output_fields)}.",
        *([f"- Answers one of: {', '.join(task.choices)}."] if task.choices else []),
        f"- Numbers are written as `{recipe.prompt.number_format}` (done for you by copa)."
        if recipe.prompt.number_format else "- Inputs are passed as text.", "",
        "## Data", "",
        f"- Source: `{recipe.data.source}`; splits train {splits.train}, val {splits.val}, "
        f"test {splits.test} (seed {splits.seed}), deduplicated on the inputs, never "
        "overlapping.", "",
        "## Results", "", *_results(bundle.report, bundle.arm), "",
        "## How it was trained", "", *_training(bundle, bundle.report), "",
        "## Licenses", "",
        f"- Base model: {license_text}. The fine-tuned weights derive from it.",
        f"- Data: {data_license(recipe)}.", ""]
    return "\n".join(lines)



def _round_trip(info: dict[str, Any], metric: str) -> list[str]:
    check = info.get("verify")
    if not check:
        return ["Not checked: export again with `--verify` to score the GGUF on the run's test "
                "split."]
    run = f" (the run's {_pct(check['run_score'])})" if check.get("run_score") is not None \
        else ""
    return [f"`copa export --verify` loaded `model.gguf` back with transformers (as copa loads "
            f"its embedded GGUF model), scored the run's {check['rows']} test rows with copa's "
            "engine and compared each answer with the run's own prediction for this arm:", "",
            f"- `{metric}`: {_pct(check['score'])}{run}.",
            f"- Answers identical to the run's: {check['identical']} of {check['rows']} "
            f"({_pct(check['agreement'])} %)."
            + (f" Failed calls: {check['errors']}." if check.get("errors") else ""), "",
            "This checks the weights and tokenizer the GGUF holds, through transformers; it does "
            "not run llama.cpp's own kernels, whose float arithmetic differs slightly."]


def _shell_text(text: str) -> str:
    """text as one bash word, newlines included ($'...' quoting)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


def gguf_card(bundle: Bundle, folder_name: str, info: dict[str, Any]) -> str:
    """The README.md of a `copa export --format gguf` folder."""
    recipe = bundle.recipe
    license_id, license_text = model_license(recipe)
    params = info["parameters"]
    stops = " ".join(f"'{s}'" for s in info["stop"])
    user = info["example_user_message"]
    serve = (f"llama-server -m model.gguf --jinja --temp 0 --top-k 1 --repeat-penalty 1 "
             f"-n {params['num_predict']} -c {params['num_ctx']} --port 8080")
    notes = info.get("notes") or []
    lines = [
        "---", f"license: {license_id}", f"base_model: {recipe.model.base}",
        "tags: [copa, dspy, axolotl, gguf, ollama]", "---", "",
        f"# {recipe.name}: `{recipe.task.signature}` (GGUF, {info['outtype']})", "",
        recipe.task.instructions or "", "",
        f"The {bundle.arm} arm of a copa run as `model.gguf` ({info['outtype']}, "
        f"{info['gguf_bytes'] / 2**20:.1f} MiB, converted by llama.cpp's converter, "
        f"`{info['converter']}`), with the prompt program copa optimized for it. "
        + _why(bundle), "",
        "## Run it with Ollama", "",
        "```bash",
        f"ollama create {recipe.name} -f Modelfile",
        f"ollama run {recipe.name} {_shell_text(user)}",
        "```", "",
        "The `Modelfile` holds the model's chat format as `TEMPLATE`, the kept instruction as "
        f"`SYSTEM`, the kept demos as {info['demos']} `MESSAGE` pair(s), greedy decoding "
        f"(temperature 0, top_k 1, repeat_penalty 1, num_predict {params['num_predict']}) and "
        f"the stop string(s) {stops}. Rendered as Ollama renders it, it sends byte for byte "
        "the prompt copa sends (checked when this folder was written). Send each input as the "
        "user message, written as copa writes it (the example above).", "",
        "## Run it with llama.cpp", "",
        "```bash",
        serve,
        "curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' "
        "-d @chat-example.json",
        "```", "",
        "`--jinja` makes llama-server use the chat template inside `model.gguf`, the one copa "
        "trained and prompted with. llama-server has no place for demos: each request carries "
        "the whole chat, as `chat-example.json` does (system turn, demo turns, then the input).",
        "",
        *(["## What this folder cannot carry", "", *[f"- {n}" for n in notes], ""]
          if notes else []),
        "## Round trip", "", *_round_trip(info, recipe.evaluate.metric), "",
        "## Results of the run", "", *_results(bundle.report, bundle.arm), "",
        "## How it was trained", "",
        *[line.replace("`model/`", "`model.gguf`") for line in _training(bundle, bundle.report)],
        "", "## Licenses", "",
        f"- Base model: {license_text}. The fine-tuned weights derive from it.",
        f"- Data: {data_license(recipe)}.", ""]
    return "\n".join(lines)
