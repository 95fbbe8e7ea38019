"""copa.inference.cache: DSPy's response cache lives in the run directory and is keyed by the
weights, so a re-run repeats no generation, and new weights never get old answers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import copa.inference.cache as cache_mod
import copa.inference.engine as lm_mod
from copa.inference.cache import cache_tag, model_fingerprint, use_response_cache


@pytest.fixture
def fresh_engines() -> Iterator[None]:
    yield
    lm_mod.close_all()


def test_fingerprint_follows_the_weights_and_is_remembered(tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    index = tmp_path / "fingerprints.json"
    first = model_fingerprint(model, index)
    assert index.is_file() and model_fingerprint(model, index) == first

    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model, index) != first


def test_a_change_of_the_engines_numerics_changes_the_tag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers computed with other arithmetic (e.g. SDPA decode attention, tagged with the bare
    digest) are never read back as the current engine's."""
    digest = "ab" * 32
    now = cache_tag(digest)
    assert now not in (None, digest[:16])
    monkeypatch.setattr(cache_mod, "ENGINE_NUMERICS", "another kernel")
    assert cache_tag(digest) != now


def test_a_repeated_request_is_answered_from_the_cache(tiny_model_dir: Path, tmp_path: Path,
                                                       fresh_engines: None) -> None:
    use_response_cache(tmp_path / "dspy")
    tag = model_fingerprint(tiny_model_dir, tmp_path / "fingerprints.json")[:16]
    lm = lm_mod.make_lm(str(tiny_model_dir), "tiny", max_tokens=4, cache_tag=tag)
    assert lm.model == f"local/tiny@{tag}" and lm.cache
    messages = [{"role": "user", "content": "say something"}]

    first = lm(messages=messages)
    generated = lm.engine.requests
    assert lm(messages=messages) == first
    assert lm.engine.requests == generated  # no new generation

    # Other weights (another tag): the same request is generated again.
    other = lm_mod.make_lm(str(tiny_model_dir), "tiny", max_tokens=4, cache_tag="0" * 16)
    other(messages=messages)
    assert lm.engine.requests == generated + 1
    assert any((tmp_path / "dspy").iterdir())  # on disk, in the run directory


def test_without_a_tag_nothing_is_cached(tiny_model_dir: Path, fresh_engines: None) -> None:
    lm = lm_mod.make_lm(str(tiny_model_dir), "tiny", max_tokens=4)
    messages = [{"role": "user", "content": "say something else"}]
    lm(messages=messages)
    lm(messages=messages)
    assert lm.engine.requests == 2


def _hub_snapshot(cache: Path, model_id: str, commit: str, weights: bytes) -> None:
    """A model in a local hub cache, laid out as huggingface_hub writes it (no network)."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(weights)


def test_hub_ids_nothing_identifies_are_never_cached(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder named like the ids below
    index = tmp_path / "fingerprints.json"
    hub = tmp_path / "hub"
    hub.mkdir()
    # Two different hub models absent from the local hub cache: no fingerprint, so no shared
    # cache entries (the hash of no files would be the same for both).
    assert model_fingerprint("org-a/model", index, hub_cache=hub) is None
    assert model_fingerprint("org-b/model", index, hub_cache=hub) is None
    assert model_fingerprint(tmp_path / "no-such-folder", index) is None


def test_hub_ids_are_fingerprinted_by_their_cached_commit(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    index = tmp_path / "fingerprints.json"
    hub = tmp_path / "hub"
    _hub_snapshot(hub, "org-a/model", "a" * 40, b"weights a")
    _hub_snapshot(hub, "org-b/model", "b" * 40, b"weights b")
    a = model_fingerprint("org-a/model", index, hub_cache=hub)
    b = model_fingerprint("org-b/model", index, hub_cache=hub)
    assert a is not None and b is not None and a != b
    assert model_fingerprint("org-a/model", index, hub_cache=hub) == a
    # A new revision of the same id (refs/main moves): other weights, another fingerprint.
    _hub_snapshot(hub, "org-a/model", "c" * 40, b"weights a, retrained")
    assert model_fingerprint("org-a/model", index, hub_cache=hub) not in (a, b)
