"""A local HF causal LM that generates greedy answers for a batch of chats, bitwise equal to
generating each chat alone (packed rows with per-row attention, row-independent matrix products:
copa.inference.rowgemm).

Imported only by the stages that need a model: torch and transformers load at import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# MKL's float32 GEMM picks kernels by matrix size, so a row's result depends on how many rows
# share the call (a batch of 8 vs 1 differs by ~1e-5). On Intel CPUs strict conditional-
# numerical-reproducibility mode makes every row's result independent of its batch mates (on
# others .rowgemm computes in fixed-size row blocks instead); MKL reads this once, at its
# first call, so it must be set before torch does any math (hence before import).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.cache_utils import (  # noqa: E402
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from copa import precision as _precision  # noqa: E402
from copa.inference import decoder, packed, padded, rowgemm  # noqa: E402
from copa.models import ModelFolderError, context_length, end_token_ids  # noqa: E402
from copa.text import one_line  # noqa: E402

Chat = list[dict[str, str]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One completion and what DSPy's Response needs besides the text."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length" (its max tokens reached)


def matmul_is_batch_invariant() -> bool:
    """Whether the BLAS alone computes a GEMM row independently of its batch mates (MKL strict
    mode on Intel CPUs); where it does not, LocalModel computes in row blocks (.rowgemm)."""
    return rowgemm.rows_independent(rowgemm.MODES["native"], 512, 256)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text (OpenAI semantics: the stop is not returned)."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


@contextmanager
def _folder_errors(path: str) -> Iterator[None]:
    """transformers' load failures that are the folder's (no weights file, a tokenizer or
    weights file cut short: an OSError without a file name, safetensors' own error) as a
    ModelFolderError naming the folder; anything else stays what it is."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        if isinstance(exc, OSError) and exc.filename:
            raise  # a file the CLI names itself
        raise ModelFolderError(f"{path}: the model does not load from this folder "
                               f"({one_line(exc, 300)})") from exc


class LocalModel:
    """A HF causal LM folder loaded once, generating greedily for a batch of chats.

    Prefix cache: a chat's turns before its last one (system turn, few-shot demos) are the same
    across every call of a program, so their keys and values are computed once, kept (LRU, up
    to `prefix_cache_bytes`) and reused; only the last turn is computed per call. Which part of
    a chat is its prefix depends on that chat alone, never on its batch mates, so batched
    outputs stay bitwise those of one-at-a-time generation.
    """

    def __init__(self, path: str, device: str | None = None, prefix_cache: bool = True,
                 prefix_cache_bytes: int = 256 * 2**20, trust_remote_code: bool = False,
                 precision: str = "fp32") -> None:
        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # serve.precision as resolved for this device (copa.precision): fp32 or bf16
        self.precision = _precision.resolve(precision, self.device != "cpu")
        self.dtype = _precision.torch_dtype(self.precision)
        # the recipe's model.trust_remote_code, for every load of this folder
        self.trust_remote_code = bool(trust_remote_code)
        trust = {"trust_remote_code": self.trust_remote_code}
        # Left padding, for the generate() fallback: every row's last prompt token sits at the
        # same position, where generation continues (packed decoding needs no padding).
        with _folder_errors(self.path):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.path, padding_side="left", **trust)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Per-row attention: a greedy answer must not depend on its batch mates.
        packed.register_attention()
        with _folder_errors(self.path):
            try:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=self.dtype, attn_implementation=packed.ATTENTION, **trust)
                self.rowwise_attention = True
            except (ValueError, TypeError) as exc:  # an architecture without the interface
                log.warning("%s: row-wise attention unavailable (%s); batched greedy outputs "
                            "may differ from one-at-a-time ones on near-ties", self.path, exc)
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=self.dtype, **trust)
                self.rowwise_attention = False
        self.model.to(self.device).eval()
        # Packed decoding (.packed) needs copa's attention and a plain or sliding-window cache;
        # other models go through generate() with left padding.
        self.packed = self.rowwise_attention and self._plain_cache()
        if not self.packed:
            log.warning("%s: no packed decoding for this architecture; batched greedy outputs "
                        "may differ from one-at-a-time ones on near-ties", self.path)
        # How linear layers keep rows independent of their batch mates, measured on this
        # CPU and this model's shapes (.rowgemm); on GPU cuBLAS picks kernels by batch size
        # and nothing here claims otherwise.
        self.gemm = rowgemm.choose(rowgemm.linear_shapes(self.model), self.dtype) \
            if self.device == "cpu" else "none"
        if self.gemm not in ("native", "none"):
            rowgemm.use(self.model, self.gemm)
        # True when batched greedy outputs are bitwise those of one-at-a-time generation.
        self.batch_invariant = self.packed and self.gemm != "none"
        if self.device == "cpu" and self.gemm == "none":
            log.warning("%s: neither this CPU's BLAS nor fixed-size row blocks compute matrix "
                        "rows independently of each other: batched greedy outputs may differ "
                        "from one-at-a-time ones on near-ties", self.path)
        self.eos_ids = self._end_ids()
        self.context = context_length(self.model.config.to_dict())
        self.prefix_cache = prefix_cache and self.packed
        self.prefix_cache_bytes = int(prefix_cache_bytes)
        self._prefixes: OrderedDict[tuple[int, ...], list[packed.KV]] = OrderedDict()
        self.prefix_stats = {"hits": 0, "misses": 0, "tokens_reused": 0}
        self._lock = threading.Lock()  # one generate at a time: torch already uses every core

    def _plain_cache(self) -> bool:
        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # noqa: BLE001 - an exotic config: go without the prefix cache
            return False
        # Sliding-window layers keep every key here; the row-wise attention applies the window.
        return bool(layers) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                                    for layer in layers)

    def _end_ids(self) -> set[int]:
        """Token ids that end an answer (copa.models.end_token_ids)."""
        return end_token_ids(self.tokenizer, self.model.generation_config)

    def render(self, messages: Chat) -> str:
        """The prompt text for a chat, ending where the assistant's answer starts."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)

    def split_prompt(self, messages: Chat) -> tuple[tuple[int, ...], list[int]]:
        """A chat's prompt tokens as (cacheable prefix, rest): the prefix is every turn before
        the last one, when its tokens are exactly the start of the whole prompt's tokens."""
        text = self.render(messages)
        ids = self._ids(text)
        if not self.prefix_cache or len(messages) < 2:
            return (), ids
        try:
            head = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that wants a user turn last, say
            return (), ids
        if not head or not text.startswith(head):
            return (), ids
        head_ids = self._ids(head)
        n = len(head_ids)
        if not 0 < n < len(ids) or ids[:n] != head_ids:  # the boundary merged two tokens
            return (), ids
        return tuple(head_ids), ids[n:]

    def _ids(self, text: str) -> list[int]:
        # The chat template already holds the special tokens: add none twice.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[Chat], max_new_tokens: list[int],
                 stop: list[list[str] | None]) -> list[str]:
        """Greedy completions for a batch of chats, each with its own max tokens and stops."""
        return [g.text for g in self.generate_detailed(prompts, max_new_tokens, stop)]

    def generate_detailed(self, prompts: list[Chat], max_new_tokens: list[int],
                          stop: list[list[str] | None],
                          sampling: Sequence[packed.Sampling | None] | None = None
                          ) -> list[Generation]:
        """Completions for a batch of chats: greedy, or sampled where a row's `sampling` says
        so (a seeded row gives the same answer alone or in any batch)."""
        sampling = list(sampling) if sampling is not None else [None] * len(prompts)
        if not (len(prompts) == len(max_new_tokens) == len(stop) == len(sampling)):
            raise ValueError("prompts, max_new_tokens, stop and sampling must have the same "
                             "length")
        if not prompts:
            return []
        if any(int(m) < 1 for m in max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = [list(s or []) for s in stop]
        max_new = [int(m) for m in max_new_tokens]
        with self._lock, torch.inference_mode():
            if self.packed:
                return self._generate_packed(prompts, max_new, stops, sampling)
            if any(sampling):  # generate() samples a whole batch from one stream: one by one
                return [self._generate_padded([p], [m], [s], sampled)[0]
                        for p, m, s, sampled in zip(prompts, max_new, stops, sampling,
                                                    strict=True)]
            return self._generate_padded(prompts, max_new, stops)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (a benchmark arm or a test starts cold)."""
        with self._lock:
            self._prefixes.clear()

    def stream(self) -> Stream | None:
        """Continuous decoding (requests join and leave between steps), or None where this
        model decodes through generate() (no packed decoding)."""
        return Stream(self) if self.packed else None

    def room(self, prompt_tokens: int, max_new: int) -> int:
        """The answer tokens a prompt has room for: max_new, cut where the model's context
        (copa.models.context_length) ends. A prompt that fills the context is a ValueError:
        past its positions a model answers, but from positions it never learned."""
        if self.context is None:
            return max_new
        if prompt_tokens >= self.context:
            raise ValueError(f"the prompt is {prompt_tokens} tokens, this model's context "
                             f"{self.context} (max_position_embeddings): no room for an "
                             "answer; shorten the prompt (fewer demos or passages, a shorter "
                             "input)")
        return min(max_new, self.context - prompt_tokens)

    def _row(self, chat: Chat, max_new: int, sampling: packed.Sampling | None) -> packed.Row:
        prefix, rest = self.split_prompt(chat)
        return packed.Row(tokens=rest, max_new=self.room(len(prefix) + len(rest), max_new),
                          prefix=self._prefix_kv(prefix) if prefix else [], sampling=sampling,
                          history=prefix)

    def _generate_packed(self, prompts: list[Chat], max_new: list[int], stops: list[list[str]],
                         sampling: list[packed.Sampling | None]) -> list[Generation]:
        rows = [self._row(chat, m, sampled)
                for chat, m, sampled in zip(prompts, max_new, sampling, strict=True)]
        ends = decoder.decode(self.model, rows, lambda i, new: self._stop_reason(new, stops[i]))
        return [self._finish(new, reason, stops[i], row.prefix_len + len(row.tokens))
                for i, (row, (new, reason)) in enumerate(zip(rows, ends, strict=True))]

    def _stop_reason(self, new: list[int], stops: list[str]) -> str | None:
        """"stop" once an answer's newest token ends the turn or its text shows a stop string."""
        if new[-1] in self.eos_ids or (stops and _find_stop(self._decode(new), stops) is not None):
            return "stop"
        return None

    def _finish(self, new: list[int], reason: str, stops: list[str],
                prompt_tokens: int) -> Generation:
        """The answer text: without a closing end-of-turn token, cut before a stop string."""
        n_out = len(new)
        if new and new[-1] in self.eos_ids:
            new = new[:-1]
        text = self._decode(new)
        cut = _find_stop(text, stops)
        return Generation(text=text if cut is None else text[:cut], prompt_tokens=prompt_tokens,
                          output_tokens=n_out, finish_reason=reason)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _generate_padded(self, prompts: list[Chat], max_new: list[int], stops: list[list[str]],
                         sampling: packed.Sampling | None = None) -> list[Generation]:
        """The fallback: one left-padded generate() (no prefix cache, no per-row attention);
        with `sampling`, one prompt sampled from its seed."""
        rows = [self._ids(self.render(p)) for p in prompts]
        max_new = [self.room(len(r), m) for r, m in zip(rows, max_new, strict=True)]
        ends = padded.generate(self.model, rows, max_new, self.tokenizer.pad_token_id,
                               self.eos_ids, lambda i, new: self._stop_reason(new, stops[i]),
                               sampling)
        return [self._finish(new, reason, stops[i], len(rows[i]))
                for i, (new, reason) in enumerate(ends)]

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[packed.KV]:
        """The prefix's keys and values per layer, computed once (alone) and kept."""
        layers = self._prefixes.get(prefix)
        if layers is None:
            self.prefix_stats["misses"] += 1
            batch = packed.PackedBatch([packed.Row(tokens=list(prefix), max_new=0)])
            batch.forward(self.model, {0: list(prefix)})
            # kept in the model's dtype: a bf16 model's keys, held in fp32 while decoding
            # (packed.buffer_dtype), are exact in bf16, so a prefix takes half the bytes
            layers = self._prefixes[prefix] = [(k.to(self.dtype), v.to(self.dtype))
                                               for k, v in batch.prefix_of(0)]
            self._evict()
        else:
            self.prefix_stats["hits"] += 1
            self.prefix_stats["tokens_reused"] += len(prefix)
            self._prefixes.move_to_end(prefix)
        return layers

    def _evict(self) -> None:
        def size(layers: list[packed.KV]) -> int:
            return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                       for k, v in layers)

        total = sum(size(layers) for layers in self._prefixes.values())
        while len(self._prefixes) > 1 and total > self.prefix_cache_bytes:
            _, layers = self._prefixes.popitem(last=False)
            total -= size(layers)


class Stream:
    """Continuous batching on a LocalModel: requests join the decoding between its steps and
    each leaves with its answer as soon as it ends, so a long generation does not hold back
    short ones. Answers are those of generate_detailed (a row's logits do not depend on its
    batch mates or on when it joined). One thread drives a stream."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.decoder = decoder.Decoder(model.model, self._stop_reason)
        self._requests: dict[int, tuple[list[str], int]] = {}  # row -> (stops, prompt tokens)

    def __len__(self) -> int:
        return len(self.decoder)

    def prepare(self, chat: Chat, max_new: int, stop: Sequence[str] | None = None,
                sampling: packed.Sampling | None = None) -> tuple[packed.Row, list[str]]:
        """A request as a row to add (tokenized, its prefix's keys computed or taken from the
        cache); raises on a request the model cannot take, which then fails alone."""
        if int(max_new) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        with self.model._lock, torch.inference_mode():
            return self.model._row(chat, int(max_new), sampling), list(stop or [])

    def add(self, prepared: Sequence[tuple[packed.Row, list[str]]]) -> list[int]:
        """Prepared requests to decode from the next step on; returns their keys."""
        keys = self.decoder.add([row for row, _ in prepared])
        for key, (row, stops) in zip(keys, prepared, strict=True):
            self._requests[key] = (stops, row.prefix_len + len(row.tokens))
        return keys

    def step(self) -> list[tuple[int, Generation]]:
        """One forward of every request in flight; the ones that ended, with their answers."""
        with self.model._lock, torch.inference_mode():
            ended = self.decoder.step()
        out = []
        for key, new, reason in ended:
            stops, prompt_tokens = self._requests.pop(key)
            out.append((key, self.model._finish(new, reason, stops, prompt_tokens)))
        return out

    def _stop_reason(self, key: int, new: list[int]) -> str | None:
        return self.model._stop_reason(new, self._requests[key][0])
