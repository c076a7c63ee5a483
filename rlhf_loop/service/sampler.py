"""One token per row of a batch, each row drawn with its own request's parameters and generator.

    token_ids = sample(logits, rows)       # logits (B, V); rows[i] is batch row i; None: that row's logits are broken

Greedy rows (temperature 0) take the argmax, all at once. The other rows are tempered,
cut to their nucleus (`top_p`) and drawn with `torch.multinomial` from their request's
own `torch.Generator`, one call per request over its rows, in row order. So a request's
draws depend only on its seed and its own logits, never on which other requests share
the step (batching can still move a logit in its last bits: docs/service.md says how
often that changes an answer).

Numerically safe for every temperature >= 0 and every top_p in (0, 1], so that no
parameter a client may send can make a draw fail (the batched maths would fail every
request of the batch):
- the tempered logits are `(logits - row max) / temperature`, in float32: every value is
  <= 0 and the top one is exactly 0, so the softmax never sees +inf and its sum is >= 1
  (no NaN), however small the temperature;
- a temperature below float32's smallest normal number (1.2e-38; 5e-324 is a float64)
  would round to 0 or lose its precision in float32: such a row is greedy, which is what
  its tempered distribution is anyway (one float32 step below a logit of 1, 6e-8, divided
  by it is -5e30: all the mass on the top token, exact ties aside);
- a temperature above float32's largest number (3.4e38, up to 1e308) would be inf, and
  a gap of -inf over inf is NaN: it is capped there, which already makes every token of
  finite logit equally likely;
- a top_p below float32's smallest number is 0 after the cast: the nucleus keeps its top
  token whatever top_p says (`nucleus`), so it is never empty.
What the sampler cannot make safe is the logits themselves: a row with a NaN or +inf
logit, or none finite (a broken model, an overflow in a low-precision forward) draws
nothing and comes back as None; the engine fails that row's request alone. A logit of
-inf is a token the model rules out, and is never drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlhf_loop.service.request import Choice

F32 = torch.finfo(torch.float32)
GREEDY_BELOW = F32.smallest_normal  # temperatures below it sample the argmax (see the module docstring)


def sample(logits: torch.Tensor, rows: Sequence["Choice"]) -> list[int | None]:
    """(B, V) logits -> B token ids; None for a row whose logits are not finite (its request must fail)."""
    params = [c.request.params for c in rows]
    logits = logits.float()
    top, argmax = logits.max(-1)  # (B,): NaN where a row holds a NaN, +inf for +inf, -inf if none finite
    ok = top.isfinite()
    drawn = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    # one host sync for the greedy tokens and the broken rows together
    tokens: list[int | None] = [t if t >= 0 else None for t in argmax.masked_fill(~ok, -1).tolist()]
    if not drawn:
        return tokens
    if len(drawn) < len(rows):
        logits, top, ok = logits[drawn], top[drawn], ok[drawn]  # (S, V), (S,), (S,)
    # (S, V): <= 0, the top token's 0; a broken row becomes all zeros so that the batched maths stays finite
    # (its draw is thrown away)
    gaps = torch.where(ok[:, None], logits - top[:, None], 0.0)
    temperature = [min(params[i].temperature, F32.max) for i in drawn]
    top_p = [params[i].top_p for i in drawn]
    # one scalar for the common case of one temperature: no (S, 1) tensor to build per step
    scale = temperature[0] if len(set(temperature)) == 1 else torch.tensor(temperature, device=logits.device)[:, None]
    probs = torch.softmax(gaps / scale, dim=-1)  # (S, V)
    if min(top_p) < 1.0:
        probs = nucleus(probs, torch.tensor(top_p, device=logits.device))
    at = 0
    for request, same in groupby(drawn, key=lambda i: rows[i].request):
        k = len(list(same))
        picked = torch.multinomial(probs[at:at + k], 1, generator=request.generator).view(-1).tolist()
        for i, token in zip(drawn[at:at + k], picked):
            if tokens[i] is not None:
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
