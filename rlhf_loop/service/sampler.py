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
    from rlhf_loop.service.request import Choice


def sample(logits: torch.Tensor, rows: Sequence["Choice"]) -> list[int]:
    """(B, V) logits -> B token ids."""
    params = [c.request.params for c in rows]
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(drawn) < len(rows):
        tokens = logits.argmax(-1).tolist()
        if not drawn:
            return tokens
        logits = logits[drawn]
    else:
        tokens = [0] * len(rows)
    temperature = [params[i].temperature for i in drawn]
    top_p = [params[i].top_p for i in drawn]
    # one scalar for the common case of one temperature: no (S, 1) tensor to build per step
    scale = temperature[0] if len(set(temperature)) == 1 else torch.tensor(temperature, device=logits.device)[:, None]
    probs = torch.softmax(logits.float() / scale, dim=-1)  # (S, V)
    if min(top_p) < 1.0:
        probs = nucleus(probs, torch.tensor(top_p, device=logits.device))
    at = 0
    for request, same in groupby(drawn, key=lambda i: rows[i].request):
        k = len(list(same))
        picked = torch.multinomial(probs[at:at + k], 1, generator=request.generator).view(-1).tolist()
        for i, token in zip(drawn[at:at + k], picked):
            tokens[i] = token
        at += k
    return tokens


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(S, V) probabilities, (S,) nucleus masses -> (S, V) with each row cut to its smallest set of
    most likely tokens whose mass reaches top_p (the top token always stays)."""
    cut = top_p < 1.0
    if not cut.any():
        return probs
    sorted_probs, order = probs[cut].sort(dim=-1, descending=True)
    # drop a token when the mass before it already reaches top_p
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[cut, None]
    drop[:, 0] = False  # even when top_p is below float32's smallest number (0 after the cast): never an empty nucleus
    probs = probs.clone()
    probs[cut] = torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs
