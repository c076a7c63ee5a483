"""One token per row of a batch, each row drawn with its own request's parameters and generator.

    token_ids = sample(logits, rows)       # logits (B, V); rows[i] is batch row i

Greedy rows (temperature 0) take the argmax, all at once. The other rows are tempered,
cut to their nucleus (`top_p`) and drawn with `torch.multinomial` from their request's
own `torch.Generator`, one call per request over its rows, in row order. So a request's
draws depend only on its seed and its own logits, never on which other requests share
the step (batching can still move a logit in its last bits: docs/service.md says how
often that changes an answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from service.request import Choice


def sample(logits: torch.Tensor, rows: Sequence["Choice"]) -> list[int]:
    """(B, V) logits -> B token ids."""
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    temperature = torch.tensor([c.request.params.temperature for c in rows], device=logits.device)  # (B,)
    greedy = temperature == 0
    if greedy.any():
        out[greedy] = logits[greedy].argmax(-1)
    if not greedy.all():
        drawn = (~greedy).nonzero().squeeze(-1)  # (S,)
        top_p = torch.tensor([rows[i].request.params.top_p for i in drawn.tolist()], device=logits.device)
        probs = nucleus(torch.softmax(logits[drawn].float() / temperature[drawn, None], dim=-1), top_p)  # (S, V)
        at = 0
        for request, same in groupby((rows[i].request for i in drawn.tolist())):
            k = len(list(same))
            out[drawn[at:at + k]] = torch.multinomial(probs[at:at + k], 1, generator=request.generator).squeeze(-1)
            at += k
    return out.tolist()


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(S, V) probabilities, (S,) nucleus masses -> (S, V) with each row cut to its smallest set of
    most likely tokens whose mass reaches top_p (the top token always stays)."""
    cut = top_p < 1.0
    if not cut.any():
        return probs
    sorted_probs, order = probs[cut].sort(dim=-1, descending=True)
    # drop a token when the mass before it already reaches top_p
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[cut, None]
    probs = probs.clone()
    probs[cut] = torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs
