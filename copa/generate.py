"""A local HF causal LM that generates greedy answers for a batch of chats, bitwise equal to
generating each chat alone (row-wise attention over real keys only, MKL strict mode).

Imported only by the stages that need a model: torch and transformers load at import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# MKL's float32 GEMM picks kernels by matrix size, so a row's result depends on how many rows
# share the call (a batch of 8 vs 1 differs by ~1e-5). Strict conditional-numerical-
# reproducibility mode makes every row's result independent of its batch mates; MKL reads this
# once, at its first call, so it must be set before torch does any math (hence before import).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

Chat = list[dict[str, str]]
log = logging.getLogger(__name__)
ROWWISE_ATTENTION = "copa_rowwise_sdpa"


@dataclass(frozen=True)
class Generation:
    """One completion and what DSPy's Response needs besides the text."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length" (its max tokens reached)


class _PerRowStop(transformers.StoppingCriteria):
    """Marks each row done on eos, on its own max tokens, or when one of its stop strings shows.

    Returns a per-row bool tensor, so generate() pads finished rows and ends when all are done.
    It records where each row ended, so the caller cuts exactly there (not at the batch's end).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, max_new: Sequence[int],
                 stops: Sequence[Sequence[str]], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new = list(max_new)
        self.stops = [list(s) for s in stops]
        self.eos_ids = eos_ids
        self.ended_at: list[int | None] = [None] * len(self.max_new)
        self.reason: list[str] = ["length"] * len(self.max_new)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        n = new.shape[1]
        for i in range(new.shape[0]):
            if self.ended_at[i] is not None:
                continue
            if int(new[i, -1]) in self.eos_ids:
                self.ended_at[i], self.reason[i] = n, "stop"
            elif self.stops[i] and _find_stop(self._decode(new[i]), self.stops[i]) is not None:
                self.ended_at[i], self.reason[i] = n, "stop"
            elif n >= self.max_new[i]:
                self.ended_at[i] = n
        done = [end is not None for end in self.ended_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)


def _rowwise_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA run row by row on each row's real (non-padding) queries and keys only.

    With padding, batched SDPA reduces over the padded key range too: the masked keys add
    exact zeros, but the reduction's blocking and alignment shift, so a padded row's logits
    differ from the same prompt alone by ~1e-5, enough to flip a greedy near-tie. Cutting each
    row down to exactly what it would be alone makes the attention bitwise batch-invariant.
    Padding may sit at the start (left padding) or between a cached prefix and the rest of
    the prompt (see LocalModel's prefix cache). The cost is one small SDPA call per row and layer.
    """
    bsz, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    real = _real_keys(attention_mask, bsz, q_len, kv_len)
    if real is None:  # not a causal mask over padded rows: standard SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for b, keys in enumerate(real):
        if keys is None:  # no padding: the row as it is (contiguous, as it would be alone)
            q, k, v = (t[b:b + 1].contiguous() for t in (query, key, value))
            queries = None
        else:  # gathering copies: the kernel sees the same layout as for the row alone
            queries = keys[keys >= kv_len - q_len] - (kv_len - q_len)
            q, k, v = query[b:b + 1, :, queries], key[b:b + 1, :, keys], value[b:b + 1, :, keys]
        ql, kl = q.shape[2], k.shape[2]
        mask = None
        if 1 < ql < kl:  # queries are the last ql of kl positions: causal with an offset
            mask = torch.ones(ql, kl, dtype=torch.bool, device=q.device).tril(kl - ql)
        row = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=1 < ql == kl, enable_gqa=gqa)
        if queries is not None and ql < q_len:  # padding queries: zeros (nothing reads them)
            full = row.new_zeros(1, row.shape[1], q_len, row.shape[3])
            full[:, :, queries] = row
            row = full
        rows.append(row)
    out = torch.cat(rows)
    return out.transpose(1, 2).contiguous(), None


def _real_keys(mask: torch.Tensor | None, bsz: int, q_len: int,
               kv_len: int) -> list[torch.Tensor | None] | None:
    """Per row, the indices of its real keys (None: all are real), or None for the whole batch
    when the mask is not "causal over each row's real tokens" (then standard SDPA runs)."""
    if mask is None:
        return [None] * bsz
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != kv_len \
            or mask.shape[-2] != q_len or mask.shape[1] != 1:
        return None
    real = mask[:, 0, -1, :]  # the last query is a real token and sees every real key
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    expected = real[:, None, :] & causal
    real_query = real[:, kv_len - q_len:, None]
    if not bool(((mask[:, 0] == expected) | ~real_query).all()):  # e.g. a sliding window
        return None
    return [None if bool(row.all()) else row.nonzero().squeeze(-1) for row in real]


def _register_rowwise_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROWWISE_ATTENTION, _rowwise_sdpa)
    AttentionMaskInterface.register(ROWWISE_ATTENTION, sdpa_mask)


def matmul_is_batch_invariant() -> bool:
    """Whether a GEMM row's result is independent of its batch mates (MKL strict mode took)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    x = torch.randn(64, 512, generator=gen)
    full = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w), full[:m]) for m in (1, 3, 8))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text (OpenAI semantics: the stop is not returned)."""
    hits = [text.find(s) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


class LocalModel:
    """A HF causal LM folder loaded once, generating greedily for a batch of chats.

    Prefix cache: a chat's turns before its last one (system turn, few-shot demos) are the same
    across every call of a program, so their keys and values are computed once, kept (LRU, up
    to `prefix_cache_bytes`) and reused; only the last turn is computed per call. Which part of
    a chat is its prefix depends on that chat alone, never on its batch mates, so batched
    outputs stay bitwise those of one-at-a-time generation.
    """

    def __init__(self, path: str, device: str | None = None, prefix_cache: bool = True,
                 prefix_cache_bytes: int = 256 * 2**20) -> None:
        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Prompts are padded on the left: every row's last prompt token sits at the same
        # position, where generation continues; position ids come from the attention mask.
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # fp32 and row-wise attention: a greedy answer must not depend on its batch mates.
        _register_rowwise_attention()
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32, attn_implementation=ROWWISE_ATTENTION)
            self.rowwise_attention = True
        except (ValueError, TypeError) as exc:  # an architecture without the attention interface
            log.warning("%s: row-wise attention unavailable (%s); batched greedy outputs may "
                        "differ from one-at-a-time ones on near-ties", self.path, exc)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32)
            self.rowwise_attention = False
        self.model.to(self.device).eval()
        mkl_strict = self.device == "cpu" and matmul_is_batch_invariant()
        # True when batched greedy outputs are bitwise those of one-at-a-time generation
        # (CPU only: cuBLAS picks kernels by batch size too).
        self.batch_invariant = self.rowwise_attention and mkl_strict
        if self.device == "cpu" and not mkl_strict:
            log.warning("MKL strict mode is off (torch did math before copa.lm was imported, or "
                        "MKL_CBWR was set otherwise): batched greedy outputs may differ from "
                        "one-at-a-time ones on near-ties. Export MKL_CBWR=AUTO,STRICT to fix.")
        self.eos_ids = self._end_ids()
        # Padding between a cached prefix and the rest needs copa's attention (which reads any
        # padding layout) and plain full-attention cache layers (no sliding windows).
        self.prefix_cache = prefix_cache and self.rowwise_attention and self._plain_cache()
        self.prefix_cache_bytes = int(prefix_cache_bytes)
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = \
            OrderedDict()
        self.prefix_stats = {"hits": 0, "misses": 0, "tokens_reused": 0}
        self._lock = threading.Lock()  # one generate at a time: torch already uses every core

    def _plain_cache(self) -> bool:
        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # noqa: BLE001 - an exotic config: go without the prefix cache
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _end_ids(self) -> set[int]:
        """Token ids that end an answer.

        A tokenizer converted from GGUF can name the wrong eos (SmolLM2's says <|im_start|>),
        while generation_config holds the real one; a chat template's end-of-turn marker ends a
        turn whatever either says.
        """
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        template = self.tokenizer.chat_template or ""
        for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
            if marker in template:
                tid = self.tokenizer.convert_tokens_to_ids(marker)
                if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                    ids.add(tid)
        return {int(i) for i in ids}

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
                          stop: list[list[str] | None]) -> list[Generation]:
        if not (len(prompts) == len(max_new_tokens) == len(stop)):
            raise ValueError("prompts, max_new_tokens and stop must have the same length")
        if not prompts:
            return []
        if any(int(m) < 1 for m in max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = [list(s or []) for s in stop]
        split = [self.split_prompt(p) for p in prompts]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (prefix, _) in enumerate(split):
            groups.setdefault(prefix, []).append(i)
        results: list[Generation | None] = [None] * len(prompts)
        with self._lock, torch.inference_mode():
            for prefix, rows in groups.items():
                gens = self._generate_rows(prefix, [split[i][1] for i in rows],
                                           [int(max_new_tokens[i]) for i in rows],
                                           [stops[i] for i in rows])
                for i, gen in zip(rows, gens, strict=True):
                    results[i] = gen
        return [g for g in results if g is not None]

    def _generate_rows(self, prefix: tuple[int, ...], rests: list[list[int]],
                       max_new: list[int], stops: list[list[str]]) -> list[Generation]:
        """One generate() for rows sharing a prefix: [prefix | padding | rest] each."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(r) for r in rests)
        ids = [[*prefix, *[pad_id] * (width - len(r)), *r] for r in rests]
        mask = [[1] * len(prefix) + [0] * (width - len(r)) + [1] * len(r) for r in rests]
        input_ids = torch.tensor(ids, device=self.device)
        attention_mask = torch.tensor(mask, device=self.device)
        extra: dict[str, Any] = {}
        if prefix:
            extra["past_key_values"] = self._prefix_kv(prefix, len(rests))
        prompt_len = input_ids.shape[1]
        criteria = _PerRowStop(self.tokenizer, prompt_len, max_new, stops, self.eos_ids)
        # A fresh config, so sampling settings in the model's generation_config.json are not
        # merged in (they would warn with do_sample=False).
        config = transformers.GenerationConfig(
            max_new_tokens=max(max_new), do_sample=False, num_beams=1,
            eos_token_id=sorted(self.eos_ids), pad_token_id=pad_id)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            stopping_criteria=transformers.StoppingCriteriaList([criteria]), **extra)
        results = []
        for i in range(len(rests)):
            end = criteria.ended_at[i]
            new = out[i, prompt_len:prompt_len + (end if end is not None else max_new[i])]
            n_out = int(new.shape[0])
            if n_out and int(new[-1]) in self.eos_ids:
                new = new[:-1]
            text = self.tokenizer.decode(new.tolist(), skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
            cut = _find_stop(text, stops[i])
            if cut is not None:
                text = text[:cut]
            results.append(Generation(
                text=text, prompt_tokens=len(prefix) + len(rests[i]),
                output_tokens=n_out, finish_reason=criteria.reason[i]))
        return results

    def _prefix_kv(self, prefix: tuple[int, ...], rows: int) -> DynamicCache:
        """A fresh cache holding the prefix's keys and values for each of `rows` rows."""
        layers = self._prefixes.get(prefix)
        if layers is None:
            self.prefix_stats["misses"] += 1
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True,
                             logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            self._prefixes[prefix] = layers
            self._evict()
        else:
            self.prefix_stats["hits"] += 1
            self.prefix_stats["tokens_reused"] += len(prefix) * rows
            self._prefixes.move_to_end(prefix)
        # generate() appends to the cache: every call gets its own copy.
        return DynamicCache(ddp_cache_data=[(k.repeat(rows, 1, 1, 1), v.repeat(rows, 1, 1, 1))
                                            for k, v in layers], config=self.model.config)

    def _evict(self) -> None:
        def size(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
            return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                       for k, v in layers)

        total = sum(size(layers) for layers in self._prefixes.values())
        while len(self._prefixes) > 1 and total > self.prefix_cache_bytes:
            _, layers = self._prefixes.popitem(last=False)
            total -= size(layers)
