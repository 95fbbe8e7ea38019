"""The decode loop on a PackedBatch: each step one packed forward of every unfinished row, a
token picked per row (greedy, or sampled from the row's own seeded stream), rows joining and
leaving between steps (continuous batching), and rows decoding alone checking drafts of
several tokens per forward (copa.inference.draft). A row's logits do not depend on its batch
mates or on its drafts (copa.inference.packed), so its answer is the same however it ran.
Imported only where a model runs (torch at import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from copa.inference import draft, packed
from copa.inference.draft import Pace, PromptLookup
from copa.inference.packed import PackedBatch, Row, Sampling


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from a row's logits: temperature, then top-k, then top-p (nucleus) filtering."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Keep the smallest set whose probability reaches top_p (the first token always).
        drop = cumulative - ordered.softmax(-1) >= sampling.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


class Decoder:
    """Packed decoding one forward at a time, so rows can join between steps (continuous
    batching) and each leaves, with its answer, as soon as it ends.

    is_done(row, new_ids) gives the reason a row ends at its newest token (e.g. "stop"), or
    None to go on; a row that reaches its max_new tokens ends with "length". A row's logits
    do not depend on its batch mates (PackedBatch), so its answer is the same whenever it joins.

    A row decoding alone (or with up to `draft_rows - 1` others) guesses up to `draft_tokens`
    tokens ahead from its own text and checks them in the same forward: several tokens for one
    read of the weights, and the same answer (greedy, or sampled from the same seed). None:
    copa.inference.draft's DRAFT_TOKENS and DRAFT_ROWS; 0 tokens: no guesses.
    """

    def __init__(self, model: torch.nn.Module,
                 is_done: Callable[[int, list[int]], str | None],
                 draft_tokens: int | None = None, draft_rows: int | None = None) -> None:
        self.model = model
        self.is_done = is_done
        # a draft's positions must attend as single decode steps do, query by query
        stepwise = packed.attends_stepwise(next(model.parameters()).device)
        self.draft_tokens = (draft.DRAFT_TOKENS if draft_tokens is None else draft_tokens) \
            if stepwise else 0
        self.draft_rows = draft.DRAFT_ROWS if draft_rows is None else draft_rows
        self.batch = PackedBatch()
        self.feed: dict[int, list[int]] = {}  # row -> tokens its next forward takes
        self.new: dict[int, list[int]] = {}  # row -> tokens generated so far
        self.generators: dict[int, torch.Generator] = {}  # sampled rows' own random streams
        self.lookups: dict[int, PromptLookup] = {}  # rows' texts, for drafts
        self.paces: dict[int, Pace] = {}  # and how many tokens each guesses next
        self.drafted = 0  # tokens guessed, and how many of them held
        self.accepted = 0

    def __len__(self) -> int:
        return len(self.feed)

    def add(self, rows: Sequence[Row]) -> list[int]:
        """Rows to continue from the next step on; returns their indices."""
        keys = self.batch.add(rows)
        for key, row in zip(keys, rows, strict=True):
            self.feed[key] = list(row.tokens)
            self.new[key] = []
            if row.sampling is not None:
                self.generators[key] = torch.Generator().manual_seed(row.sampling.seed)
        return keys

    def step(self) -> list[tuple[int, list[int], str]]:
        """One forward of every unfinished row; returns the rows that ended at it as
        (row, new token ids, finish reason)."""
        drafts = self._drafts()
        # this forward's tokens; self.feed changes only once it went through
        fed_now = {key: fed + drafts[key] if key in drafts else fed
                   for key, fed in self.feed.items()}
        logits = self.batch.forward(self.model, fed_now, drafts)
        picks = logits.argmax(-1).tolist()
        still: dict[int, list[int]] = {}
        ended = []
        at = 0
        for key, fed in fed_now.items():
            row = self.batch.rows[key]
            # the token picked after each fed one, up to the first guess it disagrees with: a
            # sampled row draws once per token it keeps, as it would without guesses
            n = len(fed) if key in drafts else 1
            tokens = []
            for i in range(n):
                tokens.append(int(picks[at + i]) if row.sampling is None else
                              _sample(logits[at + i], row.sampling, self.generators[key]))
                if i + 1 == n or fed[i + 1] != tokens[-1]:
                    break
            at += n
            if key in drafts:
                held = len(tokens) - 1
                self.batch.rewind(key, n - 1 - held)
                self.paces[key].record(n - 1, held)
                self.drafted += n - 1
                self.accepted += held
            new = self.new[key]
            reason = None
            for token in tokens:
                new.append(token)
                reason = self.is_done(key, new)
                if reason is not None or len(new) >= row.max_new:
                    break
            else:
                if key in self.lookups:
                    self.lookups[key].extend(tokens)
                still[key] = [new[-1]]
                continue
            ended.append((key, self.new.pop(key), reason or "length"))
            self.generators.pop(key, None)
            self.lookups.pop(key, None)
            self.paces.pop(key, None)
            self.batch.release(key)
        self.feed = still
        return ended

    def _drafts(self) -> dict[int, list[int]]:
        """This step's guesses (row -> tokens after its fed one), for rows past their prompt
        while few rows decode; none longer than the row's room for new tokens. A row's text
        is indexed the first time it may guess (rows that never decode alone never pay)."""
        if not self.draft_tokens or len(self.feed) > self.draft_rows:
            return {}
        drafts = {}
        for key, fed in self.feed.items():
            if len(fed) != 1 or not self.new[key]:
                continue
            row = self.batch.rows[key]
            lookup = self.lookups.get(key)
            if lookup is None:
                # the fed token is the answer's last, already in new
                lookup = self.lookups[key] = PromptLookup([*row.history, *row.tokens,
                                                           *self.new[key]])
                self.paces[key] = Pace(self.draft_tokens)
            room = row.max_new - len(self.new[key]) - 1
            guess = lookup.draft(min(self.paces[key].next(), room))
            if guess:
                drafts[key] = guess
        return drafts


def decode(model: torch.nn.Module, rows: Sequence[Row],
           is_done: Callable[[int, list[int]], str | None],
           draft_tokens: int | None = None) -> list[tuple[list[int], str]]:
    """Continue every row, greedily or by its own sampling: (new token ids, finish reason).

    is_done(row, new_ids) gives the reason a row ends at its newest token (e.g. "stop"), or
    None to go on; a row that reaches its max_new tokens ends with "length". A row
    decoding alone checks drafts of up to `draft_tokens` tokens per step (Decoder).
    """
    decoder = Decoder(model, is_done, draft_tokens)
    keys = decoder.add(rows)
    ends: dict[int, tuple[list[int], str]] = {}
    while decoder:
        for key, new, reason in decoder.step():
            ends[key] = (new, reason)
    return [ends[key] for key in keys]
