"""Drafts from a row's own text (prompt lookup): when its last few tokens appeared before,
the tokens that followed them then are a guess at what follows now.

A decode step reads every weight once whatever the number of rows it computes, so checking a
guess of k tokens costs one forward of k + 1 positions instead of k + 1 forwards. The row's own
pick at each position decides (its greedy pick, or its sample drawn from its seeded stream as
it would be without guesses): the guess is kept up to its first token the pick disagrees
with, and that pick is the next token, so the answer is the one plain decoding gives
(copa.inference.packed: each position's logits are bitwise those it gets alone). Text that
repeats what it read (field markers, restated numbers, quoted demos, a small model's loops)
is where guesses hold. Imported without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

# The most tokens a row guesses per step (Pace): on Zen 4 a product of a few rows costs what
# one row does (copa.inference.rowgemm's floor4), but each guessed position also attends over
# the whole cache: a wrong guess of 3 tokens made a step at a 2k-token context ~1.6x as long.
DRAFT_TOKENS = 4
# Rows guess only while at most this many decode together: a batch's products already compute
# several rows per weight read, and each guess adds rows to them.
DRAFT_ROWS = 1


class PromptLookup:
    """The n-grams (`shortest` to `longest` tokens) of a row's text so far, each with where its
    latest earlier occurrence was followed; `draft` looks up the text's last n-gram, longest
    first. Kept up to date as tokens are added, so a step costs a few dict lookups."""

    def __init__(self, tokens: Sequence[int], longest: int = 3, shortest: int = 2) -> None:
        self.tokens: list[int] = []
        self.longest, self.shortest = longest, shortest
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens added to the end of the text."""
        for token in tokens:
            # the old last token stops being the end of the text: its n-grams become lookable
            end = len(self.tokens)
            for n in range(self.shortest, min(self.longest, end) + 1):
                self.follows[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the text's ending, or
        none when its last `shortest` tokens never appeared before."""
        if k < 1:
            return []
        for n in range(min(self.longest, len(self.tokens)), self.shortest - 1, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []


class Pace:
    """How many tokens a row guesses at its next step: one more after a guess that held
    entirely (up to `most`), half as many after one that failed at its first token, and once a
    one-token guess fails, no guess for a pause that doubles with each such failure (up to
    64 steps): text that stopped repeating itself costs little."""

    def __init__(self, most: int, first: int = 2) -> None:
        self.most = most
        self.size = min(first, most)
        self.pause = 0  # steps left without a guess
        self.wait = 1  # the next pause's length

    def next(self) -> int:
        """Tokens to guess now (0: none this step)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.size

    def record(self, guessed: int, held: int) -> None:
        """How the last guess went: `held` of its `guessed` tokens were right."""
        if held == guessed:
            self.size = min(self.most, self.size + 1)
            self.wait = 1
        elif held == 0:
            if self.size == 1:
                self.pause, self.wait = self.wait, min(2 * self.wait, 64)
            self.size = max(1, self.size // 2)
