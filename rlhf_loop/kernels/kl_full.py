"""Exact per-token KL(pi || pi_ref) over the whole vocabulary, from both logit rows in one pass.

    full_kl(logits, ref_logits, *, temperature=1.0, backend=None)

`logits` (policy) and `ref_logits` (reference model) are (N, V) or (B, T, V), same shape, in
fp32/bf16/fp16 (fp64 gives fp64). With p = softmax(logits / temperature) and
q = softmax(ref_logits / temperature) (the temperature applies to both, as for the sampled
log-probs), returns sum_j p_j (log p_j - log q_j) per token in fp32, shape logits.shape[:-1].
Differentiable w.r.t. `logits`; also w.r.t. `ref_logits` when that requires grad (a frozen
reference model normally does not, and then no gradient is computed for it).

Memory: forward keeps three length-N vectors (KL and both log-sum-exps); backward re-reads both
logit rows and writes only the gradient(s), in the logits' dtype. No (N, V) fp32 tensor.

Dispatch as for every op in `kernels/` (CUDA -> Triton, CPU -> Triton interpreter under
TRITON_INTERPRET=1, else a chunked torch path); ``backend=`` forces one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_loop.kernels import _dispatch

# Formula, per row with z = logits / temperature, w = ref_logits / temperature:
#   lse_p = log sum exp z,  lse_q = log sum exp w        (two online log-sum-exps, one pass)
#   KL    = sum_j p_j (z_j - w_j) - lse_p + lse_q
#           (a = sum exp(z_j - m_p) (z_j - w_j) is rescaled with the p-side max; sum p (z - w) = a / s_p)
# Backward, recomputing p and q from the logits and the saved lse_p, lse_q, KL:
#   d KL / d z_j = p_j ((log p_j - log q_j) - KL)
#   d KL / d w_j = q_j - p_j
#   each times g / temperature for the logits.
# Traps: int64 row offsets; fp32 accumulation (fp64 for fp64 inputs); masked lanes load -inf on
# both sides, so p * (z - w) is guarded with where(p > 0) (also covers -inf in both rows; -inf
# only in the reference row gives +inf, the true KL); the running maxima start at a finite -1e30.


@triton.jit
def _full_kl_fwd_kernel(
    logits_ptr,  # (B, T, V) with unit stride along V
    ref_ptr,  # (B, T, V) with unit stride along V
    kl_ptr,  # (N,) ACC
    lse_p_ptr,  # (N,) ACC
    lse_q_ptr,  # (N,) ACC
    V,
    T,
    stride_b,
    stride_t,
    ref_stride_b,
    ref_stride_t,
    inv_temperature,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    ref_row_ptr = ref_ptr + (row // T) * ref_stride_b + (row % T) * ref_stride_t
    m_p = tl.full((), -1.0e30, ACC)
    s_p = tl.zeros((), ACC)
    a = tl.zeros((), ACC)
    m_q = tl.full((), -1.0e30, ACC)
    s_q = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temperature
        w = tl.load(ref_row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temperature
        m_p_new = tl.maximum(m_p, tl.max(z, 0))
        alpha = tl.exp(m_p - m_p_new)
        e_p = tl.exp(z - m_p_new)
        s_p = s_p * alpha + tl.sum(e_p, 0)
        a = a * alpha + tl.sum(tl.where(e_p > 0.0, e_p * (z - w), 0.0), 0)
        m_p = m_p_new
        m_q_new = tl.maximum(m_q, tl.max(w, 0))
        s_q = s_q * tl.exp(m_q - m_q_new) + tl.sum(tl.exp(w - m_q_new), 0)
        m_q = m_q_new
    lse_p = m_p + tl.log(s_p)
    lse_q = m_q + tl.log(s_q)
    tl.store(kl_ptr + row, a / s_p - lse_p + lse_q)
    tl.store(lse_p_ptr + row, lse_p)
    tl.store(lse_q_ptr + row, lse_q)


@triton.jit
def _full_kl_bwd_kernel(
    logits_ptr,  # (B, T, V)
    ref_ptr,  # (B, T, V)
    kl_ptr,  # (N,) ACC
    lse_p_ptr,  # (N,) ACC
    lse_q_ptr,  # (N,) ACC
    grad_kl_ptr,  # (N,) ACC
    grad_logits_ptr,  # (N, V) contiguous, logits dtype
    grad_ref_ptr,  # (N, V) contiguous, ref dtype; written only when REF_GRAD
    V,
    T,
    stride_b,
    stride_t,
    ref_stride_b,
    ref_stride_t,
    inv_temperature,
    REF_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    ref_row_ptr = ref_ptr + (row // T) * ref_stride_b + (row % T) * ref_stride_t
    kl = tl.load(kl_ptr + row)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    g = tl.load(grad_kl_ptr + row) * inv_temperature
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        log_p = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temperature - lse_p
        log_q = tl.load(ref_row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temperature - lse_q
        p = tl.exp(log_p)
        grad = tl.where(p > 0.0, g * p * ((log_p - log_q) - kl), 0.0)
        tl.store(grad_logits_ptr + row * V + cols, grad, mask=mask)
        if REF_GRAD:
            tl.store(grad_ref_ptr + row * V + cols, g * (tl.exp(log_q) - p), mask=mask)


def _triton_forward(rows, ref_rows, temperature):
    """rows, ref_rows: (B, T, V). Returns kl, lse_p, lse_q, each (N,)."""
    _dispatch.require_launchable(_full_kl_fwd_kernel, rows)
    B, T, V = rows.shape
    n = B * T
    acc = _dispatch.acc_dtype(rows.dtype)
    kl = torch.empty(n, dtype=acc, device=rows.device)
    lse_p = torch.empty(n, dtype=acc, device=rows.device)
    lse_q = torch.empty(n, dtype=acc, device=rows.device)
    if n == 0:
        return kl, lse_p, lse_q
    block = _dispatch.block_v(V)
    _full_kl_fwd_kernel[(n,)](
        rows, ref_rows, kl, lse_p, lse_q,
        V, T, rows.stride(0), rows.stride(1), ref_rows.stride(0), ref_rows.stride(1), 1.0 / temperature,
        ACC=_dispatch.tl_acc_dtype(rows.dtype), BLOCK_V=block, num_warps=_dispatch.num_warps(block),
    )  # fmt: skip
    return kl, lse_p, lse_q


def _triton_backward(rows, ref_rows, kl, lse_p, lse_q, grad_kl, temperature, ref_grad):
    """Returns (grad_logits, grad_ref or None), each a contiguous (N, V) tensor."""
    B, T, V = rows.shape
    n = B * T
    grad_logits = torch.empty(n, V, dtype=rows.dtype, device=rows.device)  # (N, V)
    grad_ref = torch.empty(n, V, dtype=ref_rows.dtype, device=rows.device) if ref_grad else None  # (N, V)
    if n == 0:
        return grad_logits, grad_ref
    block = _dispatch.block_v(V)
    _full_kl_bwd_kernel[(n,)](
        rows, ref_rows, kl, lse_p, lse_q, grad_kl, grad_logits, grad_logits if grad_ref is None else grad_ref,
        V, T, rows.stride(0), rows.stride(1), ref_rows.stride(0), ref_rows.stride(1), 1.0 / temperature,
        REF_GRAD=ref_grad, ACC=_dispatch.tl_acc_dtype(rows.dtype), BLOCK_V=block,
        num_warps=_dispatch.num_warps(block),
    )  # fmt: skip
    return grad_logits, grad_ref


# Chunked torch path: at most this many logits per operand are expanded at once.
_TORCH_CHUNK_ELEMENTS = 1 << 21


def _torch_chunks(rows, ref_rows):
    """Yields (flat_start, flat_end, chunk, ref_chunk) over rows of two (B, T, V) tensors."""
    B, T, V = rows.shape
    step = max(1, _TORCH_CHUNK_ELEMENTS // V)
    for b in range(B):
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            yield b * T + t0, b * T + t1, rows[b, t0:t1], ref_rows[b, t0:t1]


def _torch_forward(rows, ref_rows, temperature):
    B, T, _ = rows.shape
    acc = _dispatch.acc_dtype(rows.dtype)
    kl = torch.empty(B * T, dtype=acc, device=rows.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    for start, end, chunk, ref_chunk in _torch_chunks(rows, ref_rows):
        log_p = chunk.to(acc) / temperature  # (R, V)
        log_q = ref_chunk.to(acc) / temperature  # (R, V)
        lse_p[start:end] = torch.logsumexp(log_p, dim=-1)
        lse_q[start:end] = torch.logsumexp(log_q, dim=-1)
        log_p.sub_(lse_p[start:end].unsqueeze(-1))
        log_q.sub_(lse_q[start:end].unsqueeze(-1))
        p = log_p.exp()
        kl[start:end] = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    return kl, lse_p, lse_q


def _torch_backward(rows, ref_rows, kl, lse_p, lse_q, grad_kl, temperature, ref_grad):
    B, T, V = rows.shape
    acc = _dispatch.acc_dtype(rows.dtype)
    grad_logits = torch.empty(B * T, V, dtype=rows.dtype, device=rows.device)  # (N, V)
    grad_ref = torch.empty(B * T, V, dtype=ref_rows.dtype, device=rows.device) if ref_grad else None
    for start, end, chunk, ref_chunk in _torch_chunks(rows, ref_rows):
        log_p = chunk.to(acc) / temperature - lse_p[start:end].unsqueeze(-1)  # (R, V)
        log_q = ref_chunk.to(acc) / temperature - lse_q[start:end].unsqueeze(-1)  # (R, V)
        p = log_p.exp()
        g = (grad_kl[start:end] / temperature).unsqueeze(-1)  # (R, 1)
        grad_logits[start:end] = torch.where(p > 0, g * p * ((log_p - log_q) - kl[start:end].unsqueeze(-1)), 0.0)
        if grad_ref is not None:
            grad_ref[start:end] = g * (log_q.exp() - p)
    return grad_logits, grad_ref


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, backend):
        rows = _dispatch.as_rows(logits)  # (B, T, V)
        ref_rows = _dispatch.as_rows(ref_logits)  # (B, T, V)
        impl = _triton_forward if backend == "triton" else _torch_forward
        kl, lse_p, lse_q = impl(rows, ref_rows, temperature)
        ctx.save_for_backward(rows, ref_rows, kl, lse_p, lse_q)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.shapes = (logits.shape, ref_logits.shape)
        return kl.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        rows, ref_rows, kl, lse_p, lse_q = ctx.saved_tensors
        grad_kl = grad_kl.reshape(-1).to(kl.dtype).contiguous()
        impl = _triton_backward if ctx.backend == "triton" else _torch_backward
        grad_logits, grad_ref = impl(rows, ref_rows, kl, lse_p, lse_q, grad_kl, ctx.temperature, ctx.needs_input_grad[1])
        grad_ref = None if grad_ref is None else grad_ref.view(ctx.shapes[1])
        return grad_logits.view(ctx.shapes[0]), grad_ref, None, None


def full_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact KL(softmax(logits/T) || softmax(ref_logits/T)) per token, fp32, shape logits.shape[:-1]."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape")
    if logits.device != ref_logits.device:
        raise ValueError(f"logits are on {logits.device} but ref_logits on {ref_logits.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if _dispatch.acc_dtype(logits.dtype) != _dispatch.acc_dtype(ref_logits.dtype):
        raise TypeError(f"logits ({logits.dtype}) and ref_logits ({ref_logits.dtype}) need the same accumulation dtype")
    resolved = _dispatch.resolve_backend(backend, logits)
    return _FullKL.apply(logits, ref_logits, float(temperature), resolved)
