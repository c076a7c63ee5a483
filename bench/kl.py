"""Exact per-token KL(pi || pi_ref) from two logit tensors: kernels.full_kl against the usual ways.

    PYTHONPATH=. .venv/bin/python bench/kl.py            # GPU: the issue's sizes; CPU: a small one
    PYTHONPATH=. .venv/bin/python bench/kl.py --full     # the issue's sizes on any device

Methods (all take (B, T, V) policy and reference logits, return fp32 (B, T) KL; the gradient is
w.r.t. the policy logits only, the reference being frozen):
  ours          kernels.full_kl (Triton on CUDA; its chunked torch path on CPU)
  eager         two log_softmax(x.float()), then sum(p * (log p - log q))
  per_row_loop  the eager formula one sequence at a time (TRL's selective_log_softmax loop)
  chunked_lse   the eager formula over chunks of 1024 rows in fp32 (OpenRLHF's chunking)
  compile_eager torch.compile(eager)

Measured per (N tokens, V) as in bench/logprobs.py: forward time (no_grad), forward+backward
time, peak extra memory of each (CUDA only), forward bandwidth (bytes of both logit tensors /
forward time) and its fraction of the device's peak, max abs error against float64 on the first
rows. Defaults: N in {8192, 16384}, V in {32000, 151936}, bf16 on CUDA; N=1024, V=32000, bf16 on
CPU (--threads sets torch's CPU threads). Results go to bench/results/kl-<device-slug>.json.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import _timing
from rlhf_loop.kernels import full_kl

SEQ_LEN = 1024
CHUNK_ROWS = 1024
ERR_ROWS = 256


def eager(logits, ref_logits):
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def per_row_loop(logits, ref_logits):
    return torch.stack([eager(x, y) for x, y in zip(logits, ref_logits, strict=True)])


def chunked_lse(logits, ref_logits):
    V = logits.shape[-1]
    x, y = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    kl = torch.cat([eager(x[i : i + CHUNK_ROWS], y[i : i + CHUNK_ROWS]) for i in range(0, x.shape[0], CHUNK_ROWS)])
    return kl.view(logits.shape[:-1])


def ours(logits, ref_logits):
    return full_kl(logits, ref_logits)


def methods() -> dict[str, Callable]:
    return {
        "ours": ours,
        "eager": eager,
        "per_row_loop": per_row_loop,
        "chunked_lse": chunked_lse,
        "compile_eager": torch.compile(eager),
    }


def reference(logits, ref_logits):
    log_p = torch.log_softmax(logits.double(), dim=-1)
    log_q = torch.log_softmax(ref_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def bench_config(n_tokens, vocab, dtype, device, args, progress) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    B, T = max(1, n_tokens // SEQ_LEN), min(n_tokens, SEQ_LEN)
    logits = (torch.randn(B, T, vocab, generator=gen, device=device) * 2).to(dtype)  # (B, T, V)
    ref_logits = (logits.float() + torch.randn(B, T, vocab, generator=gen, device=device) * 0.5).to(dtype)  # (B, T, V)
    grad_out = torch.randn(B, T, generator=gen, device=device)  # (B, T)
    err_rows = min(T, ERR_ROWS)
    ref = reference(logits[0, :err_rows], ref_logits[0, :err_rows])  # (err_rows,) float64
    fwd_bytes = 2 * logits.numel() * logits.element_size() + B * T * 4
    return _timing.time_methods(methods(), logits, ref_logits, grad_out, ref, err_rows, fwd_bytes, device, args, progress)


def main(argv: list[str] | None = None) -> int:
    return _timing.run_bench("kl", __doc__, methods, bench_config, SEQ_LEN, argv)


if __name__ == "__main__":
    raise SystemExit(main())
