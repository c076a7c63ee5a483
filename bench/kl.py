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

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import _timing
from kernels import full_kl

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
    rows = []
    for name, fn in methods().items():
        if name not in args.methods:
            continue
        progress.set_description(f"N={n_tokens} V={vocab} {name}")
        leaf = logits.detach().requires_grad_(True)

        def forward(fn=fn):
            with torch.no_grad():
                return fn(logits, ref_logits)

        def forward_backward(fn=fn, leaf=leaf):
            return torch.autograd.grad(fn(leaf, ref_logits), leaf, grad_out)

        row = {"method": name, "N": B * T, "V": vocab, "dtype": str(dtype).removeprefix("torch.")}
        row.update(_timing.measure(forward, forward_backward, device, warmup=args.warmup, repeats=args.repeats))
        _timing.add_bandwidth(row, fwd_bytes, device)
        if row["fwd_ms"] is not None:
            row["max_abs_err"] = float((forward()[0, :err_rows].double() - ref).abs().max())
        rows.append(row)
        progress.update(1)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _timing.add_common_args(parser, list(methods()))
    args = parser.parse_args(argv)
    device = _timing.pick_device()
    n_list, v_list = _timing.resolve_args(args, device, gpu_n=[8192, 16384], gpu_v=[32000, 151936], cpu_n=[1024], cpu_v=[32000])
    dtype = getattr(torch, args.dtype)
    env = _timing.environment(device)
    ours_backend = "triton" if device.type == "cuda" else "torch (chunked fallback: the Triton kernels run on CUDA)"

    rows, summaries = [], {}
    with tqdm(total=len(n_list) * len(v_list) * len(args.methods), file=sys.stderr) as progress:
        for n_tokens in n_list:
            for vocab in v_list:
                config_rows = bench_config(n_tokens, vocab, dtype, device, args, progress)
                rows += config_rows
                summaries[f"N={n_tokens},V={vocab}"] = _timing.summarize(config_rows, device)

    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  ours runs: {ours_backend}")
    _timing.print_table(rows, summaries)
    payload = {
        "benchmark": "kl",
        **env,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "ours_backend": ours_backend,
        "memory_measured": device.type == "cuda",
        "settings": {"dtype": args.dtype, "seq_len": SEQ_LEN, "warmup": args.warmup, "repeats": args.repeats},
        "results": rows,
        "summary": summaries,
    }
    out = args.out or _timing.RESULTS_DIR / f"kl-{_timing.slug(env['device'])}.json"
    print(f"saved {_timing.save_json(payload, Path(out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
