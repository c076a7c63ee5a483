"""The forward kernels' variants on a GPU: which reads the logits closest to the memory's speed.

    PYTHONPATH=. python bench/kernel_variants.py [--n 16384] [--v 32000 151936] [--out FILE.json]

The forward of token_logprobs and full_kl is one pass over the logits with an online
log-sum-exp; it moves N·V·2 bytes (bf16) and does a few operations per logit, so the memory
bound is the floor. Two ways of keeping the running sums, each at several block sizes and warp
counts:

  block   (kernels/ today) one running max and sum per row: each block of BLOCK_V logits is
          reduced across the program's threads (a max, then a sum) before the next is loaded
  lanes   a running max and sum per lane, BLOCK_V of them: no reduction inside the loop, one at
          the end; one exp per logit (the larger of the running max and the logit is kept, the
          smaller's exp rescales the sum)

Each variant is checked against float64 torch on the first rows, then timed with
triton.testing.do_bench (median). Its bandwidth is bytes read over time, against the datasheet
(H200 4.8 TB/s) and against a device-to-device copy of the same tensor measured in the same run.
CUDA only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from rlhf_loop.kernels import _dispatch, full_kl, token_logprobs

DATASHEET_GBPS = {"H200": 4800.0, "H100": 3350.0}


@triton.jit
def _logprobs_lanes_kernel(logits_ptr, labels_ptr, logp_ptr, V, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    m = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        up = z > m
        x = tl.exp(-tl.abs(z - m))  # exp(m - z) when z is the new max, else exp(z - m)
        s = tl.where(up, s * x + 1.0, s + x)
        m = tl.maximum(m, z)
    big = tl.max(m, 0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), 0))
    label = tl.load(labels_ptr + row).to(tl.int64)
    tl.store(logp_ptr + row, tl.load(row_ptr + label).to(tl.float32) - lse)


@triton.jit
def _kl_lanes_kernel(p_ptr, q_ptr, kl_ptr, V, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row, q_row = p_ptr + row * stride, q_ptr + row * stride
    m_p = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    s_p = tl.zeros((BLOCK_V,), tl.float32)
    a = tl.zeros((BLOCK_V,), tl.float32)
    m_q = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    s_q = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(p_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        w = tl.load(q_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        up = z > m_p
        x = tl.exp(-tl.abs(z - m_p))
        e = tl.where(up, 1.0, x)  # exp(z - new max)
        s_p = tl.where(up, s_p * x + 1.0, s_p + x)
        a = tl.where(up, a * x, a) + tl.where(e > 0.0, e * (z - w), 0.0)
        m_p = tl.maximum(m_p, z)
        up_q = w > m_q
        x_q = tl.exp(-tl.abs(w - m_q))
        s_q = tl.where(up_q, s_q * x_q + 1.0, s_q + x_q)
        m_q = tl.maximum(m_q, w)
    big_p = tl.max(m_p, 0)
    scale_p = tl.exp(m_p - big_p)
    sum_p = tl.sum(s_p * scale_p, 0)
    big_q = tl.max(m_q, 0)
    lse_q = big_q + tl.log(tl.sum(s_q * tl.exp(m_q - big_q), 0))
    tl.store(kl_ptr + row, tl.sum(a * scale_p, 0) / sum_p - (big_p + tl.log(sum_p)) + lse_q)


def lanes_logprobs(logits, labels, block, warps):
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    _logprobs_lanes_kernel[(n,)](logits, labels, out, v, logits.stride(0), BLOCK_V=block, num_warps=warps)
    return out


def lanes_kl(p, q, block, warps):
    n, v = p.shape
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    _kl_lanes_kernel[(n,)](p, q, out, v, p.stride(0), BLOCK_V=block, num_warps=warps)
    return out


def block_variant(op, block, warps):
    """kernels/ as shipped, with its block size and warp count set for the call."""
    def run(*args):
        saved = _dispatch.block_v, _dispatch.num_warps
        _dispatch.block_v, _dispatch.num_warps = (lambda v: block), (lambda b: warps)
        try:
            with torch.no_grad():
                return op(*args)
        finally:
            _dispatch.block_v, _dispatch.num_warps = saved
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    datasheet = next((g for k, g in DATASHEET_GBPS.items() if k in name), None)
    block_configs = [(4096, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 16), (8192, 8), (8192, 16)]
    lanes_configs = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]
    rows = []
    for v in args.v:
        gen = torch.Generator(device=dev).manual_seed(v)
        logits = (torch.randn(args.n, v, generator=gen, device=dev) * 2).to(torch.bfloat16)
        ref = (logits.float() + 0.3 * torch.randn(args.n, v, generator=gen, device=dev)).to(torch.bfloat16)
        labels = torch.randint(0, v, (args.n,), generator=gen, device=dev)
        nbytes = logits.numel() * logits.element_size()
        copy_ms = triton.testing.do_bench(lambda: logits.clone(), return_mode="median")
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        k = 64
        want_lp = torch.log_softmax(logits[:k].double(), -1).gather(-1, labels[:k, None]).squeeze(-1)
        lp, lq = torch.log_softmax(logits[:k].double(), -1), torch.log_softmax(ref[:k].double(), -1)
        want_kl = (lp.exp() * (lp - lq)).sum(-1)
        cases = [("logprobs", "block", c, block_variant(token_logprobs, *c), (logits, labels), nbytes, want_lp)
                 for c in block_configs]
        cases += [("logprobs", "lanes", c, lambda a, b, c=c: lanes_logprobs(a, b, *c), (logits, labels), nbytes,
                   want_lp) for c in lanes_configs]
        cases += [("full_kl", "block", c, block_variant(full_kl, *c), (logits, ref), 2 * nbytes, want_kl)
                  for c in block_configs]
        cases += [("full_kl", "lanes", c, lambda a, b, c=c: lanes_kl(a, b, *c), (logits, ref), 2 * nbytes, want_kl)
                  for c in lanes_configs]
        for op, kind, (block, warps), fn, inputs, read, want in cases:
            row = {"op": op, "kind": kind, "block_v": block, "warps": warps, "N": args.n, "V": v}
            try:
                got = fn(*inputs)
                torch.cuda.synchronize()
                row["max_err"] = (got[:k].double() - want).abs().max().item()
                ms = triton.testing.do_bench(lambda: fn(*inputs), return_mode="median")
                row.update(ms=ms, gbps=read / ms / 1e6)
                row["pct_datasheet"] = 100 * row["gbps"] / datasheet if datasheet else None
                row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            except Exception as e:  # a config that does not compile (registers, shared memory) is reported
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append({"op": "copy", "V": v, "N": args.n, "ms": copy_ms, "gbps": copy_gbps})
        del logits, ref
        torch.cuda.empty_cache()
    print(f"\n{name}: forward variants, N={args.n} bf16 (copy = device-to-device clone, read+write)")
    print(f"{'op':9} {'kind':6} {'V':>7} {'block':>6} {'warps':>5} {'ms':>7} {'GB/s':>7} {'%sheet':>6} {'%copy':>6} {'max err':>8}")
    for r in rows:
        if r["op"] == "copy":
            print(f"{'copy':9} {'':6} {r['V']:>7} {'':>6} {'':>5} {r['ms']:7.3f} {r['gbps']:7.0f}")
        elif "error" in r:
            print(f"{r['op']:9} {r['kind']:6} {r['V']:>7} {r['block_v']:>6} {r['warps']:>5} {r['error'][:60]}")
        else:
            print(f"{r['op']:9} {r['kind']:6} {r['V']:>7} {r['block_v']:>6} {r['warps']:>5} {r['ms']:7.3f} "
                  f"{r['gbps']:7.0f} {r['pct_datasheet'] or 0:6.1f} {r['pct_copy']:6.1f} {r['max_err']:8.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
