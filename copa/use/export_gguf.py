"""copa export --format gguf: one arm of a finished run for llama.cpp and Ollama.

  OUT_DIR/
    model.gguf         the arm's model, converted by llama.cpp's converter (f32, f16 or q8_0),
                       with the chat template copa trains and prompts with
    Modelfile          Ollama: FROM ./model.gguf, the chat format as TEMPLATE, the kept
                       instruction as SYSTEM, the kept demos as MESSAGE pairs, greedy decoding
    chat-example.json  one test row as the chat copa sends (a llama-server request body)
    program.json, template.jinja, recipe.yaml, report.json   as in the folder export
    copa-gguf.json     what was converted how, the checks, the round trip's numbers
    convert.log        the converter's output
    README.md          model card: results, how to run it with Ollama and llama.cpp

Checked before the folder appears (it is written beside OUT_DIR and renamed into place, so it
is whole or absent): the GGUF holds the model's chat template (and, for a model that came from
a GGUF, the same tokenizer); the Modelfile, rendered as Ollama renders it, sends byte for byte
the text copa's adapter sends for a test row. --verify adds the round trip (copa.use.gguf).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from copa.files import atomic_dir, atomic_write_json, atomic_write_text, sha256_file
from copa.use import ollama
from copa.use.bundle import Bundle, open_bundle
from copa.use.card import gguf_card
from copa.use.export import (
    ExportError,
    ExportRefused,
    check_destination,
    model_folder,
    shareable_recipe,
    write_program,
)
from copa.use.gguf import (
    CONVERTER_PACKAGE,
    OUTTYPES,
    GGUFError,
    check_gguf,
    convert,
    converter_dir,
    install_hint,
    verify,
)
from copa.use.limits import model_context

# What makes Ollama and llama.cpp decode as copa does: greedy, no repetition penalty (Ollama's
# default is 1.1), the recipe's answer budget.
GREEDY = {"temperature": 0, "top_k": 1, "repeat_penalty": 1}


@dataclass(frozen=True)
class StaticPrompt:
    """The chat copa's adapter sends for one example, cut into what a Modelfile can hold."""

    messages: list[dict[str, str]]  # the whole chat: [system], demo turns, the user turn
    system: str | None
    demos: list[dict[str, str]]
    user: str
    notes: list[str]  # what the static Modelfile cannot carry


def example_inputs(bundle: Bundle) -> dict[str, Any]:
    """The first test row's inputs (a run), else placeholders (an export folder has no data)."""
    split = bundle.root / "rendered" / "splits" / "test.jsonl"
    if bundle.kind == "run" and split.is_file():
        from copa.data import read_jsonl

        rows = read_jsonl(split)
        if rows:
            return {f: rows[0][f] for f in bundle.recipe.task.input_fields}
    return {f: f"<{f}>" for f in bundle.recipe.task.input_fields}


def static_prompt(bundle: Bundle, inputs: Mapping[str, Any]) -> StaticPrompt:
    """Through copa's own path: the recipe's program with the run's program.json loaded, and
    the recipe's adapter formatting its one predictor's instructions, demos and the inputs."""
    from copa.dspy.kit import make_adapter, run_retriever
    from copa.dspy.program import make_program

    recipe = bundle.recipe
    notes: list[str] = []
    retriever = None
    if recipe.retrieve is not None:
        retriever = run_retriever(recipe, bundle.root / "rendered") \
            if bundle.kind == "run" else None
        notes.append(f"This program retrieves {recipe.retrieve.k} passages per input (BM25, "
                     f"field `{recipe.retrieve.field}`); Ollama and llama.cpp cannot: put the "
                     "passages into each user message as copa formats them.")
    if "knn" in recipe.optimize.optimizer.lower():
        notes.append(f"{recipe.optimize.optimizer} chooses demos per input; this static "
                     "Modelfile carries none of them.")
    program = make_program(recipe, retriever)
    if bundle.program_path is not None:
        program.load(str(bundle.program_path))
    predictors = program.predictors()
    if len(predictors) != 1:
        raise ExportRefused(f"the program has {len(predictors)} predictors: a Modelfile holds "
                            "one prompt (export --format hf and serve it with copa)")
    predictor = predictors[0]
    values = dict(inputs)
    if recipe.retrieve is not None:
        query = recipe.retrieve.query or recipe.task.input_fields[0]
        values[recipe.retrieve.field] = retriever.search(str(values[query])) \
            if retriever is not None else [f"<passage {i + 1}>" for i in range(recipe.retrieve.k)]
    adapter = make_adapter(recipe, bundle.spec())
    messages = adapter.format(predictor.signature, list(predictor.demos), values)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    demos = messages[1 if system is not None else 0:-1]
    return StaticPrompt(messages, system, demos, messages[-1]["content"], notes)


def _chat_renderer(model_dir: Path) -> tuple[ollama.RenderChat, Any]:
    """The model's own chat template, rendered as copa's engine renders it (transformers)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))

    def render(messages: ollama.Chat, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render, tokenizer


def _base_gguf(bundle: Bundle) -> Path | None:
    """The GGUF the base model came from (copa's embedded model, or a .gguf base), if any."""
    from copa.models import classify, smollm2_gguf_path

    ref = classify(bundle.recipe.model.base, bundle.recipe.base_dir)
    if ref.kind == "alias":
        return smollm2_gguf_path()
    return Path(ref.value) if ref.kind == "gguf" else None


def _context_length(model_dir: Path) -> int:
    return min(model_context(str(model_dir)) or 4096, 8192)


def export_gguf(path: str | Path, out_dir: str | Path, arm: str = "best", outtype: str = "f16",
                check_round_trip: bool = False,
                emit: Callable[[str], None] = print) -> Path:
    """Write arm `arm` of a finished run (or a folder export) as GGUF + Modelfile into out_dir."""
    if outtype not in OUTTYPES:
        raise ExportRefused(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    bundle = open_bundle(path, arm)
    out = check_destination(out_dir, bundle)
    if converter_dir() is None:
        raise ExportRefused(install_hint())
    if check_round_trip:
        predictions = bundle.root / "predictions" / f"{bundle.arm}.jsonl"
        if bundle.kind != "run" or not predictions.is_file():
            raise ExportRefused(f"--verify compares with the run's own test predictions "
                                f"({predictions.relative_to(bundle.root)}): give the run "
                                "directory, not an export folder")
    model_dir = model_folder(bundle.model_path)
    render, tokenizer = _chat_renderer(model_dir)
    try:
        fmt = ollama.chat_format(render)
    except ollama.ChatFormatError as exc:
        raise ExportRefused(f"{model_dir}: no Ollama TEMPLATE for its chat template: {exc}") \
            from None
    prompt = static_prompt(bundle, example_inputs(bundle))
    copa_text = render(prompt.messages, True)  # what copa's engine sends (LocalModel.render)
    recipe = bundle.recipe
    stops = ollama.stop_strings(fmt, tokenizer.eos_token)
    params = {**GREEDY, "num_predict": recipe.evaluate.max_tokens,
              "num_ctx": _context_length(model_dir)}
    modelfile = ollama.modelfile(
        ollama.go_template(fmt), prompt.system, prompt.demos, params, stops,
        notes=[f"copa export of {recipe.name} ({bundle.arm} arm): run `ollama create "
               f"{recipe.name} -f Modelfile` in this folder", *prompt.notes])
    if ollama.ollama_prompt(modelfile, prompt.user) != copa_text:
        raise ExportError("the Modelfile would send Ollama another prompt than copa sends "
                          "(a bug: please report it with the model's chat template)")
    emit(f"exporting the {bundle.arm} arm of {bundle.root} to {out} as GGUF ({outtype})")
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(
            dir=out.parent, prefix=f".{out.name}.work.") as work:
        gguf_file = tmp / "model.gguf"
        seconds = convert(model_dir, gguf_file, outtype, recipe.name, tmp / "convert.log",
                          Path(work))
        checks = check_gguf(gguf_file, tokenizer.chat_template, _base_gguf(bundle))
        emit(f"  converted in {seconds:.1f}s: {gguf_file.stat().st_size / 2**20:.1f} MiB")
        atomic_write_text(tmp / "Modelfile", modelfile)
        request = {"messages": prompt.messages, "max_tokens": recipe.evaluate.max_tokens,
                   "temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "stop": stops}
        atomic_write_json(tmp / "chat-example.json", request, sort_keys=False)
        write_program(bundle, tmp / "program.json")
        atomic_write_text(tmp / "template.jinja", bundle.template_text)
        atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(
            shareable_recipe(recipe, "template.jinja"), sort_keys=False, allow_unicode=True))
        if bundle.report:
            atomic_write_json(tmp / "report.json", bundle.report, sort_keys=False)
        info: dict[str, Any] = {
            "name": recipe.name, "arm": bundle.arm, "model_role": bundle.model_role,
            "outtype": outtype, "gguf_bytes": gguf_file.stat().st_size,
            "gguf_sha256": sha256_file(gguf_file), "convert_seconds": round(seconds, 1),
            "converter": CONVERTER_PACKAGE, **checks, "stop": stops, "parameters": params,
            "demos": len(prompt.demos) // 2, "notes": prompt.notes,
            "example_user_message": prompt.user, "verify": None}
        if check_round_trip:
            info["verify"] = verify(bundle, gguf_file, Path(work), emit)
        atomic_write_json(tmp / "copa-gguf.json", info, sort_keys=False)
        atomic_write_text(tmp / "README.md", gguf_card(bundle, out.name, info))
    return out


__all__ = ["GGUFError", "export_gguf", "static_prompt"]
