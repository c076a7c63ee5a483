"""Per-token log-probs from logits: kernels.token_logprobs against the usual ways, in one run.

    PYTHONPATH=. .venv/bin/python bench/logprobs.py            # GPU: the issue's sizes; CPU: a small one
    PYTHONPATH=. .venv/bin/python bench/logprobs.py --full     # the issue's sizes on any device

Methods (all take (B, T, V) logits and (B, T) labels, return fp32 (B, T) log-probs):
  ours          kernels.token_logprobs (Triton on CUDA; its chunked torch path on CPU)
  eager         log_softmax(logits.float()).gather(labels)          (fp32 copy of all logits)
  per_row_loop  TRL's selective_log_softmax for bf16: a loop over sequences, log_softmax per row
  chunked_lse   OpenRLHF's log_probs_from_logits: gather - logsumexp over chunks of 1024 rows (fp32)
  compile_eager torch.compile(eager)

Measured per (N tokens, V): forward time (under no_grad), forward+backward time (gradient
w.r.t. the logits via torch.autograd.grad), peak extra memory of each (CUDA only; includes the
(N, V) gradient every method returns), forward bandwidth (bytes of logits read / forward time)
and its fraction of the device's peak, and the max abs error against a float64 reference on the
first rows. Defaults: N in {8192, 16384}, V in {32000, 151936}, bf16 on CUDA; N=1024, V=32000,
bf16 on CPU (--threads sets torch's CPU threads). Results go to
bench/results/logprobs-<device-slug>.json.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import _timing
from rlhf_loop.kernels import token_logprobs

SEQ_LEN = 1024  # tokens per sequence: N tokens are laid out as (N // SEQ_LEN, SEQ_LEN)
CHUNK_ROWS = 1024  # OpenRLHF's _logsumexp_by_chunk chunk size
ERR_ROWS = 256


def eager(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def per_row_loop(logits, labels):
    """TRL selective_log_softmax, bf16/fp16 branch: one sequence at a time, log_softmax in the input dtype."""
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logps = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows).float()


def chunked_lse(logits, labels):
    """OpenRLHF log_probs_from_logits without flash-attn: gathered logit - chunked logsumexp."""
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(flat[i : i + CHUNK_ROWS].float(), dim=-1) for i in range(0, flat.shape[0], CHUNK_ROWS)])
    return label_logits - lse.view(labels.shape)


def ours(logits, labels):
    return token_logprobs(logits, labels)


def methods() -> dict[str, Callable]:
    return {
        "ours": ours,
        "eager": eager,
        "per_row_loop": per_row_loop,
        "chunked_lse": chunked_lse,
        "compile_eager": torch.compile(eager),
    }


def reference(logits, labels):
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def bench_config(n_tokens, vocab, dtype, device, args, progress) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    B, T = max(1, n_tokens // SEQ_LEN), min(n_tokens, SEQ_LEN)
    logits = (torch.randn(B, T, vocab, generator=gen, device=device) * 2).to(dtype)  # (B, T, V)
    labels = torch.randint(0, vocab, (B, T), generator=gen, device=device)  # (B, T)
    grad_out = torch.randn(B, T, generator=gen, device=device)  # (B, T)
    err_rows = min(T, ERR_ROWS)
    ref = reference(logits[0, :err_rows], labels[0, :err_rows])  # (err_rows,) float64
    fwd_bytes = logits.numel() * logits.element_size() + labels.numel() * labels.element_size() + B * T * 4
    return _timing.time_methods(methods(), logits, labels, grad_out, ref, err_rows, fwd_bytes, device, args, progress)


def main(argv: list[str] | None = None) -> int:
    return _timing.run_bench("logprobs", __doc__, methods, bench_config, SEQ_LEN, argv)


if __name__ == "__main__":
    raise SystemExit(main())
