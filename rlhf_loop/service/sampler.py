"""One token per row of a batch, each row drawn with its own request's parameters and generator.

    draws = sample(logits, rows)       # logits (B, V); rows[i] is batch row i -> B Draws; None: that row's logits are broken

Greedy rows (temperature 0) take the argmax, all at once. The other rows are tempered,
cut to their nucleus (`top_p`) and drawn with `torch.multinomial` from their request's
own `torch.Generator`, one call per request over its rows, in row order. So a request's
draws depend only on its seed and its own logits, never on which other requests share
the step (batching can still move a logit in its last bits: docs/service.md says how
often that changes an answer).

Log-probs (docs/service.md, "Log-probs"): every draw carries its token's log-prob under the
distribution it was drawn from, the tempered probabilities renormalised over the nucleus (the
same float32 tensor `multinomial` read), so it is what the policy really did; the trainer gets
it for every answer. A greedy row draws from no distribution (all its mass is on the argmax),
so its log-probs are the raw logits' log-softmax (temperature 1, no nucleus), as vLLM reports
by default. Only the rows whose request asked for `top_logprobs` pay for the top-k, and they
list only tokens that distribution could draw (a token outside the nucleus, or whose
probability is 0 in float32, has log-prob -inf: never listed).

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
  token whatever top_p says (`nucleus`), so it is never empty;
- a drawn token's probability is > 0 (multinomial never draws a 0) and the nucleus's mass is
  at least the top token's (>= 1 / V): its log-prob is finite and <= 0.
What the sampler cannot make safe is the logits themselves: a row with a NaN or +inf
logit, or none finite (a broken model, an overflow in a low-precision forward) draws
nothing and comes back as None; the engine fails that row's request alone. A logit of
-inf is a token the model rules out, and is never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import groupby

import torch

from rlhf_loop.service.request import Choice, Draw  # Draw lives there: request.py must not import this module

F32 = torch.finfo(torch.float32)
GREEDY_BELOW = F32.smallest_normal  # temperatures below it sample the argmax (see the module docstring)


def sample(logits: torch.Tensor, rows: Sequence[Choice]) -> list[Draw | None]:
    """(B, V) logits -> B draws; None for a row whose logits are not finite (its request must fail)."""
    params = [c.request.params for c in rows]
    logits = logits.float()
    top, argmax = logits.max(-1)  # (B,): NaN where a row holds a NaN, +inf for +inf, -inf if none finite
    ok = top.isfinite()
    greedy = [i for i, p in enumerate(params) if p.temperature < GREEDY_BELOW]
    drawn = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    # one host sync for the greedy tokens and the broken rows together
    tokens: list[int | None] = [t if t >= 0 else None for t in argmax.masked_fill(~ok, -1).tolist()]
    chosen = [0.0] * len(rows)  # each row's token's log-prob
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(rows)
    if greedy:
        # the raw log-softmax (module docstring): log p(argmax) = max - logsumexp; a broken row's NaN is thrown away
        raw = logits[greedy] if drawn else logits  # (G, V)
        lse = torch.logsumexp(raw, dim=-1)  # (G,)
        _fill(chosen, greedy, (top[greedy] - lse).tolist())
        _top(tops, greedy, params, raw, lambda rows_: raw[rows_] - lse[rows_, None])
    if not drawn:
        return _draws(tokens, chosen, tops)
    if greedy:
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
    picked: list[int] = []
    for request, same in groupby(drawn, key=lambda i: rows[i].request):
        k = len(list(same))
        picked += torch.multinomial(probs[at:at + k], 1, generator=request.generator).view(-1).tolist()
        at += k
    for i, token in zip(drawn, picked):
        if tokens[i] is not None:
            tokens[i] = token
    # log of the probabilities multinomial read, renormalised: the softmax sums to 1, the nucleus to its mass
    log_mass = probs.sum(-1).log() if min(top_p) < 1.0 else torch.zeros(len(drawn), device=probs.device)  # (S,)
    at_token = probs.gather(1, torch.tensor(picked, device=probs.device)[:, None]).squeeze(1)  # (S,)
    _fill(chosen, drawn, (at_token.log() - log_mass).tolist())
    _top(tops, drawn, params, probs, lambda rows_: probs[rows_].log() - log_mass[rows_, None])
    return _draws(tokens, chosen, tops)


def _fill(out: list, rows: list[int], values: list) -> None:
    for i, v in zip(rows, values):
        out[i] = v


def _top(tops: list, rows: list[int], params: list, like: torch.Tensor, logprobs_of) -> None:
    """Fill `tops[i]` for the rows (batch indices `rows`, positions in `like`) whose request asked for
    top_logprobs: `logprobs_of(positions)` (A, V) log-probs -> their k best that are finite, one host sync."""
    asked = [j for j, i in enumerate(rows) if params[i].top_logprobs]
    if not asked:
        return
    k = max(params[rows[j]].top_logprobs for j in asked)
    values, ids = logprobs_of(torch.tensor(asked, device=like.device)).topk(min(k, like.shape[-1]), dim=-1)  # (A, k)
    for j, vs, ts in zip(asked, values.tolist(), ids.tolist()):
        i = rows[j]
        tops[i] = tuple((t, v) for t, v in zip(ts, vs) if v > -math.inf)[:params[i].top_logprobs]


def _draws(tokens: list[int | None], chosen: list[float], tops: list) -> list[Draw | None]:
    return [None if t is None else Draw(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]


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
