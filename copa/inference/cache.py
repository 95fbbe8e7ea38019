"""DSPy's response cache, scoped to a run directory and keyed by the weights behind an LM.

Greedy local generation is deterministic, so a re-run (a new optimizer setting, a resumed
stage) may answer every request it already made from the cache. DSPy keys its cache on the
LM's name and the request; copa puts a hash of the model folder's files (or a hub id's cached
commit) into the name, so new weights (a re-trained adapter, even with the same recipe) never
meet old answers; a model nothing identifies is not cached at all.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from copa.files import atomic_write_json, sha256_json, sha256_tree

_configured: str | None = None
_lock = threading.Lock()


def _stat_signature(model_dir: Path) -> list[list]:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return [[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def hub_snapshot(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local snapshot folder a hub id resolves to (no network), or None when the hub cache
    holds none. Its folder name is the commit, so it names exactly the weights loaded."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_id, local_files_only=True, cache_dir=cache_dir)
    except Exception:  # not cached, not a hub id: nothing identifies the weights
        return None
    return Path(folder)


def model_fingerprint(model: str | os.PathLike[str], index: Path,
                      hub_cache: str | os.PathLike[str] | None = None) -> str | None:
    """What identifies the weights behind `model`, or None when nothing does.

    A local folder: sha256 of its files, remembered in `index` while their sizes and
    modification times stay the same (hashing weights takes seconds; a stat, microseconds).
    A hub id: the id and the commit of the snapshot the local hub cache resolves it to.
    Anything else (a hub id not in the local cache, a missing folder) gets None: the hash of
    no files would let two different models share cached answers."""
    model_dir = Path(model).expanduser()
    if not model_dir.is_dir():
        snapshot = hub_snapshot(str(model), hub_cache)
        if snapshot is None:
            return None
        return sha256_json(["hub", str(model), snapshot.name])
    model_dir = model_dir.resolve()
    signature = _stat_signature(model_dir)
    if not signature:
        return None
    with _lock:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        entry = known.get(str(model_dir))
        if isinstance(entry, dict) and entry.get("files") == signature:
            return str(entry["sha256"])
        digest = sha256_tree(model_dir)
        known[str(model_dir)] = {"files": signature, "sha256": digest}
        index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(index, known)
        return digest


# What the local engine's arithmetic is: bump it whenever a change may move a logit's bits
# (a greedy answer on a near-tie could then differ), so no cached answer of the old arithmetic
# is mistaken for the new one's. Decode steps attend with two plain products and a softmax
# instead of SDPA, in fp32 also for bf16 models (copa.inference.packed.one_query_attention);
# products may run through oneDNN's pre-packed kernels (copa.inference.rowgemm).
ENGINE_NUMERICS = "onednn-products-fp32-decode-attention"


def cache_tag(digest: str | None, precision: str = "fp32") -> str | None:
    """The tag that joins an LM's name: the weights' hash, the precision they compute in (bf16
    answers are other answers from the same weights) and the engine's ENGINE_NUMERICS."""
    if digest is None:
        return None
    return sha256_json([digest, precision, ENGINE_NUMERICS])[:16]


def weights_tag(model: str | os.PathLike[str], index: Path, serve_precision: str) -> str | None:
    """The cache tag of a model as copa's local engine serves it (recipe's serve.precision), or
    None when nothing identifies its weights (then nothing is cached)."""
    from copa.precision import for_local_engine

    return cache_tag(model_fingerprint(model, index), for_local_engine(serve_precision))


def use_response_cache(cache_dir: Path) -> None:
    """Point DSPy's response cache (memory + disk) at cache_dir for this process."""
    global _configured
    import dspy

    target = str(cache_dir.resolve())
    with _lock:
        if _configured == target:
            return
        cache_dir.mkdir(parents=True, exist_ok=True)
        # restrict_pickle: a run directory may come from someone else; its cache must not be
        # able to run code when read (copa's entries are plain data).
        dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True,
                             disk_cache_dir=target, restrict_pickle=True)
        _configured = target
