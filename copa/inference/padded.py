"""The generate() fallback, for architectures packed decoding (.packed) does not cover: one
left-padded transformers generate() over a batch, each row cut where it ended (its own stop,
its own max tokens), not at the batch's end. No prefix cache, no per-row attention: batched
answers may differ from one-at-a-time ones on near-ties (LocalModel says so when it loads).

Imported only where a model runs (torch at import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import transformers

if TYPE_CHECKING:
    from copa.inference.packed import Sampling

# is_done(row index, the row's new token ids) -> why it ended ("stop"), or None to go on
IsDone = Callable[[int, list[int]], str | None]


class _PerRowStop(transformers.StoppingCriteria):
    """Marks each row done when is_done says so, or at its own max tokens.

    Returns a per-row bool tensor, so generate() pads finished rows and ends when all are done.
    It records where each row ended, so the caller cuts exactly there (not at the batch's end).
    """

    def __init__(self, prompt_len: int, max_new: Sequence[int], is_done: IsDone) -> None:
        self.prompt_len = prompt_len
        self.max_new = list(max_new)
        self.is_done = is_done
        self.ended_at: list[int | None] = [None] * len(self.max_new)
        self.reason: list[str] = ["length"] * len(self.max_new)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        n = new.shape[1]
        for i in range(new.shape[0]):
            if self.ended_at[i] is not None:
                continue
            reason = self.is_done(i, new[i].tolist())
            if reason is not None:
                self.ended_at[i], self.reason[i] = n, reason
            elif n >= self.max_new[i]:
                self.ended_at[i] = n
        done = [end is not None for end in self.ended_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate(model: Any, rows: list[list[int]], max_new: list[int], pad_id: int,
             eos_ids: set[int], is_done: IsDone, sampling: Sampling | None = None
             ) -> list[tuple[list[int], str]]:
    """Each prompt row's new token ids and why it ended ("stop" or "length"): greedy, or with
    `sampling` the batch sampled from its one seed (so callers sample one row at a time)."""
    width = max(len(r) for r in rows)
    device = model.device
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                  device=device)
    criteria = _PerRowStop(width, max_new, is_done)
    # A fresh config, so sampling settings in the model's generation_config.json are not
    # merged in (they would warn with do_sample=False).
    config = transformers.GenerationConfig(
        max_new_tokens=max(max_new), do_sample=False, num_beams=1,
        eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    if sampling is not None:
        config.update(do_sample=True, temperature=sampling.temperature,
                      top_p=sampling.top_p or 1.0, top_k=sampling.top_k or 0)
        torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         generation_config=config,
                         stopping_criteria=transformers.StoppingCriteriaList([criteria]))
    ends = []
    for i in range(len(rows)):
        end = criteria.ended_at[i]
        new = out[i, width:width + (end if end is not None else max_new[i])].tolist()
        ends.append((new, criteria.reason[i]))
    return ends
