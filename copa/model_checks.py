"""Model checks: is `model.base` usable, told before any model loads? Cheap: reads file headers
and the local hub cache only, so validate refuses a broken folder in one line, not a traceback
from transformers when a stage first loads it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from copa.models import EMBEDDED, ModelError, classify


def check_model(base: str, base_dir: Path | None = None) -> str | None:
    """A problem with model.base, or None. Cheap: no model is loaded."""
    try:
        ref = classify(base, base_dir)
        if ref.kind == "alias":
            EMBEDDED[ref.value].locate()
        elif ref.kind == "gguf" and not Path(ref.value).is_file():
            return f"no such GGUF file: {ref.value}"
        elif ref.kind == "dir":
            return _folder_problem(Path(ref.value))
        elif ref.kind == "hub":
            return _hub_problem(ref.value)
    except ModelError as exc:
        return str(exc)
    return None


def _folder_problem(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return f"{folder} has no config.json: not a Hugging Face model folder"
    try:
        data = json.loads(config.read_bytes())
    except (ValueError, OSError) as exc:
        return f"the model folder's config.json is not valid JSON ({exc}): {config}"
    if not isinstance(data, dict):
        return f"the model folder's config.json is not a JSON object: {config}"
    return weights_problem(folder)


# The weights files transformers loads a causal LM from (one file, or an index of shards).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def weights_problem(folder: Path) -> str | None:
    """Why a model folder's weights cannot load (none there, a shard its index names is gone,
    a .safetensors file cut short), or None. Cheap: reads file headers only, so the folder is
    refused before any model loads, not by transformers' traceback when it does."""
    folder = Path(folder)
    found = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
    if not found:
        return (f"{folder} has no model weights ({' or '.join(WEIGHTS_FILES[::2])}): not a "
                "complete Hugging Face model folder")
    index = next((f for f in found if f.name.endswith(".index.json")), None)
    shards = [folder / "model.safetensors"] if index is None else []
    if index is not None:
        try:
            names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as exc:
            return f"{index}: damaged, not a weights index ({exc})"
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            return f"{folder}: shard(s) {', '.join(missing)} named in {index.name} are missing"
        shards = [folder / n for n in sorted(names)]
    for shard in shards:
        problem = _safetensors_problem(shard) if shard.suffix == ".safetensors" and \
            shard.is_file() else None
        if problem:
            return f"{shard}: damaged, {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A .safetensors file is an 8-byte header length, a JSON header naming each tensor's byte
    range, then the bytes: one shorter than its header says was cut short (a copy that stopped)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors file"
        length = struct.unpack("<Q", head)[0]
        if length > size - 8:
            return f"truncated ({size} bytes, its header alone needs {length + 8})"
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not one)"
    if size < 8 + length + end:
        return f"truncated ({size} bytes where its header needs {8 + length + end})"
    return None


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_problem(repo_id: str) -> str | None:
    """Offline, a hub id must already be in the local cache: transformers would fail only when
    it first loads the model, with a traceback."""
    if not _offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as exc:  # an id the hub library refuses
        return f"'{repo_id}' is not a hub id it can use ({exc})"
    if not isinstance(found, str):
        return (f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it first (huggingface-cli download), or name a model folder, a "
                ".gguf file or an embedded model")
    return None
