"""Drafted decoding (copa.inference.draft, decoder.Decoder): a greedy row guesses tokens from its
own text and checks them in one forward. Whatever the guesses, right or wrong, the answer is
plain decoding's, token for token (tests/fixtures/decode_golden.json), greedy or sampled from
a seed, in fp32 and bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_varied_llama

from copa.inference import decoder, packed
from copa.inference.draft import PromptLookup
from copa.inference.local import LocalModel

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "decode_golden.json").read_text())
CASES = GOLDEN["cases"]  # greedy and seeded-sampling ones


@pytest.fixture(scope="module")
def varied(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalModel:
    return LocalModel(str(save_varied_llama(tiny_model_dir, tmp_path_factory.mktemp("varied"),
                                            seed=0)))


def test_prompt_lookup_drafts_what_followed_the_ending_before() -> None:
    text = [1, 2, 3, 9, 2, 3, 5, 1, 2, 3]
    lookup = PromptLookup(text)
    # the ending's longest earlier n-gram (1 2 3, followed by 9) wins over 2 3 (followed by 5)
    assert lookup.draft(3) == [9, 2, 3]
    assert lookup.draft(0) == []
    lookup.extend([7])  # "3 7" never appeared: no guess
    assert lookup.draft(3) == []
    lookup.extend([1, 2])  # "7 1 2" is new, "1 2" was followed by 3 at its latest
    assert lookup.draft(2) == [3, 7]
    assert PromptLookup([4, 4]).draft(5) == []  # nothing before the ending
    assert PromptLookup([4, 4, 4]).draft(5) == [4]  # "4 4" followed by 4, as far as the text goes


class Oracle:
    """Drafts from the known answer, with every fifth guessed token wrong: exercises held and
    rejected guesses where the tiny random model's text never repeats itself."""

    answers: dict[tuple[int, ...], list[int]] = {}

    def __init__(self, tokens: list[int]) -> None:
        # made when a row first may guess: its prompt, then its answer so far
        self.prompt, self.answer = next(
            (len(p), a) for p, a in self.answers.items()
            if tuple(tokens[:len(p)]) == p and tokens[len(p):] == a[:len(tokens) - len(p)])
        self.tokens = list(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def draft(self, k: int) -> list[int]:
        done = len(self.tokens) - self.prompt
        guess = self.answer[done:done + k]
        return [t if (done + i) % 5 != 4 else (t + 1) % 50 for i, t in enumerate(guess)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_drafted_decoding_answers_as_plain_decoding(varied: LocalModel, precision: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    model = varied if precision == "fp32" else LocalModel(varied.path, precision="bf16")

    def decode(rows: list[packed.Row], draft_tokens: int, draft_rows: int = 1,
               is_done=lambda row, new: model._stop_reason(new, []), join_every: int = 0):
        """Each row's (new ids, finish reason), and the loop; join_every=n: rows join one at a
        time, every n steps, while the others decode."""
        loop = decoder.Decoder(model.model, is_done, draft_tokens, draft_rows)
        waiting = list(rows)
        keys = loop.add(waiting if not join_every else waiting[:1])
        del waiting[:len(keys)]
        ends, steps = {}, 0
        with torch.inference_mode():
            while loop or waiting:
                ends.update({key: (new, why) for key, new, why in loop.step()})
                steps += 1
                if waiting and steps % join_every == 0:
                    keys += loop.add([waiting.pop(0)])
        return [ends[key] for key in keys], loop

    def rows() -> list[packed.Row]:
        return [model._row(c["chat"], c["max_new"],
                           packed.Sampling(**c["sampling"]) if c["sampling"] else None)
                for c in CASES]

    plain = [decode([row], 0)[0][0] for row in rows()]
    if precision == "fp32":
        assert [new for new, _ in plain] == [c["ids"] for c in CASES]
    Oracle.answers = {(*row.history, *row.tokens): new
                      for row, (new, _) in zip(rows(), plain, strict=True)}
    monkeypatch.setattr(decoder, "PromptLookup", Oracle)
    for k in (1, 3, 6):
        drafted, loops = zip(*(decode([row], k) for row in rows()), strict=True)
        assert [ends[0] for ends in drafted] == plain
        assert sum(loop.accepted for loop in loops) > 0  # guesses held ...
        assert sum(loop.accepted for loop in loops) < sum(loop.drafted for loop in loops)
    # rows decoding together, each checking its own guesses in the same forward, and rows
    # joining while others check theirs
    together, loop = decode(rows(), 3, draft_rows=len(CASES))
    assert together == plain and loop.accepted > 0
    joining, loop = decode(rows(), 3, draft_rows=len(CASES), join_every=2)
    assert joining == plain and loop.accepted > 0

    # a stop inside a guess that held: the row ends at that token, as plain decoding ends it
    def third(row: int, new: list[int]) -> str | None:
        return "stop" if len(new) == 3 else None

    stopped, loops = zip(*(decode([row], 3, is_done=third) for row in rows()), strict=True)
    assert [ends[0] for ends in stopped] == [(new[:3], "stop") for new, _ in plain]
    assert sum(loop.accepted for loop in loops) > 0


@pytest.mark.parametrize("window", [None, 4])
def test_a_drafts_positions_attend_as_single_steps(window: int | None) -> None:
    """Each of a draft's positions attends over the keys up to its own position (the last
    `window` of them on a sliding-window layer), bitwise as that position alone would."""
    import torch

    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, prompt, n = 4, 2, 8, 9, 3

    def states(tokens: int, n_heads: int = kv_heads) -> torch.Tensor:
        return torch.randn(1, n_heads, tokens, dim, generator=gen)

    keys, values, queries = states(prompt + n), states(prompt + n), states(n, heads)
    batch = packed.PackedBatch([packed.Row(tokens=[0] * prompt, max_new=n + 1)])
    batch._plan([(0, 0, prompt, False)])
    batch.update(keys[:, :, :prompt], values[:, :, :prompt], 0)
    batch.lengths[0] = prompt
    batch._plan([(0, 0, n, True)])  # a fed token and two guesses after it
    batch.update(keys[:, :, prompt:], values[:, :, prompt:], 0)
    out = batch.attend(0, queries, 0.4, gqa=True, window=window)
    for i in range(n):
        single = packed.PackedBatch([packed.Row(tokens=[0] * prompt, max_new=n + 1)])
        single._plan([(0, 0, prompt + i, False)])
        single.update(keys[:, :, :prompt + i], values[:, :, :prompt + i], 0)
        single.lengths[0] = prompt + i
        single._plan([(0, 0, 1, False)])
        single.update(keys[:, :, prompt + i:prompt + i + 1],
                      values[:, :, prompt + i:prompt + i + 1], 0)
        alone = single.attend(0, queries[:, :, i:i + 1], 0.4, gqa=True, window=window)
        assert torch.equal(out[0, i], alone[0, 0])


def test_pace_guesses_more_while_guesses_hold_and_pauses_when_they_fail() -> None:
    from copa.inference.draft import Pace

    pace = Pace(most=4, first=2)
    assert pace.next() == 2
    pace.record(2, 2)
    pace.record(3, 3)
    assert pace.next() == 4
    pace.record(4, 4)
    assert pace.next() == 4  # no more than `most`
    pace.record(4, 1)  # partly right: as many again
    assert pace.next() == 4
    pace.record(4, 0)
    pace.record(2, 0)
    assert pace.next() == 1
    pace.record(1, 0)  # a one-token guess failed: skip one step, then two after the next failure
    assert [pace.next() for _ in range(2)] == [0, 1]
    pace.record(1, 0)
    assert [pace.next() for _ in range(3)] == [0, 0, 1]
    pace.record(1, 1)  # held: the pauses start over
    pace.record(2, 0)
    pace.record(1, 0)
    assert [pace.next() for _ in range(2)] == [0, 1]
