"""Per-token log-probabilities (and entropy) from logits, without a vocabulary-sized fp32 copy.

    token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100,
                   return_entropy=False, backend=None)

`logits` is (N, V) or (B, T, V) in fp32, bf16, fp16 (or fp64); `labels` has the shape
``logits.shape[:-1]``. Returns ``log softmax(logits / temperature)[label]`` per token in fp32
(fp64 for fp64 logits) with shape ``logits.shape[:-1]``; with ``return_entropy=True`` returns
``(logp, entropy)`` where ``entropy`` is the entropy of ``softmax(logits / temperature)``.
Rows whose label equals `ignore_index` give 0 for both and receive a zero gradient.

Memory: the forward keeps three length-N vectors (log-prob, entropy, log-sum-exp); the backward
re-reads the logits and writes only the gradient, in the logits' dtype. Neither allocates an
(N, V) float32 tensor. Slices like ``logits[:, :-1]`` are read in place.

Dispatch (see `kernels/_dispatch.py`): CUDA tensors -> Triton kernels; CPU tensors -> Triton
kernels under ``TRITON_INTERPRET=1`` (set before `triton` is imported), else a chunked torch
path whose temporaries are bounded by `_TORCH_CHUNK_ELEMENTS`; ``backend=`` forces one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_loop.kernels import _dispatch

# Formula, per row with z = logits / temperature (a row of V values):
#   lse   = log sum_j exp(z_j)                  one pass, online: m <- max(m, max(block)),
#                                                s <- s * exp(m_old - m) + sum(exp(z_block - m))
#   logp  = z_label - lse
#   H     = lse - sum_j p_j z_j,  p_j = exp(z_j - lse)
#           (t = sum exp(z_j - m) z_j is carried with the same rescaling; sum p z = t / s)
# Backward, with upstream grads g (log-prob) and h (entropy), recomputing p from the logits and
# the saved lse (nothing vocabulary-sized is stored between forward and backward):
#   d logp / d z_j = onehot_j - p_j
#   d H    / d z_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + H)
#   d / d logits_j = (g (onehot_j - p_j) - h p_j (log p_j + H)) / temperature
# Traps: row offsets are int64 (N * V exceeds 2**31 at 16k x 152k); accumulate in fp32 (fp64
# for fp64 inputs) whatever the logits dtype; masked lanes load -inf, so terms of the form
# p * z are guarded with where(p > 0) to keep 0 * -inf out of the sums (also for -inf logits);
# the running max starts at a finite -1e30, so exp(m_old - m_new) never sees -inf - -inf.


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # (B, T, V) with unit stride along V
    labels_ptr,  # (N,) integer, N = B * T
    logp_ptr,  # (N,) ACC
    entropy_ptr,  # (N,) ACC, written only when RETURN_ENTROPY
    lse_ptr,  # (N,) ACC, saved for backward
    V,
    T,
    stride_b,
    stride_t,
    inv_temperature,
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
    else:
        m = tl.full((), -1.0e30, ACC)
        s = tl.zeros((), ACC)
        t = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_temperature
            m_new = tl.maximum(m, tl.max(z, 0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            s = s * alpha + tl.sum(e, 0)
            if RETURN_ENTROPY:
                t = t * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        z_label = tl.load(row_ptr + label).to(ACC) * inv_temperature
        tl.store(logp_ptr + row, z_label - lse)
        tl.store(lse_ptr + row, lse)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, lse - t / s)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # (B, T, V) with unit stride along V
    labels_ptr,  # (N,)
    lse_ptr,  # (N,) ACC
    entropy_ptr,  # (N,) ACC, read only when HAS_ENTROPY_GRAD
    grad_logp_ptr,  # (N,) ACC
    grad_entropy_ptr,  # (N,) ACC, read only when HAS_ENTROPY_GRAD
    grad_logits_ptr,  # (N, V) contiguous, logits dtype
    V,
    T,
    stride_b,
    stride_t,
    inv_temperature,
    ignore_index,
    HAS_ENTROPY_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    grad_row_ptr = grad_logits_ptr + row * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row_ptr + cols, tl.zeros((BLOCK_V,), ACC), mask=cols < V)
    else:
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_logp_ptr + row) * inv_temperature
        h = tl.zeros((), ACC)
        ent = tl.zeros((), ACC)
        if HAS_ENTROPY_GRAD:
            h = tl.load(grad_entropy_ptr + row) * inv_temperature
            ent = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temperature
            log_p = z - lse
            p = tl.exp(log_p)
            grad = tl.where(cols == label, g, 0.0) - g * p
            if HAS_ENTROPY_GRAD:
                grad -= h * tl.where(p > 0.0, p * (log_p + ent), 0.0)
            tl.store(grad_row_ptr + cols, grad, mask=mask)


def _triton_forward(rows, labels, temperature, ignore_index, return_entropy):
    """rows: (B, T, V); labels: (N,). Returns logp (N,), entropy (N,) or None, lse (N,)."""
    _dispatch.require_launchable(_token_logprobs_fwd_kernel, rows)
    B, T, V = rows.shape
    n = B * T
    acc = _dispatch.acc_dtype(rows.dtype)
    logp = torch.empty(n, dtype=acc, device=rows.device)
    lse = torch.empty(n, dtype=acc, device=rows.device)
    entropy = torch.empty(n, dtype=acc, device=rows.device) if return_entropy else None
    if n == 0:
        return logp, entropy, lse
    block = _dispatch.block_v(V)
    _token_logprobs_fwd_kernel[(n,)](
        rows, labels, logp, logp if entropy is None else entropy, lse,
        V, T, rows.stride(0), rows.stride(1), 1.0 / temperature, ignore_index,
        RETURN_ENTROPY=return_entropy, ACC=_dispatch.tl_acc_dtype(rows.dtype), BLOCK_V=block,
        num_warps=_dispatch.num_warps(block),
    )  # fmt: skip
    return logp, entropy, lse


def _triton_backward(rows, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    """Returns grad w.r.t. rows as a contiguous (N, V) tensor in the logits dtype."""
    B, T, V = rows.shape
    n = B * T
    grad_logits = torch.empty(n, V, dtype=rows.dtype, device=rows.device)  # (N, V)
    if n == 0:
        return grad_logits
    block = _dispatch.block_v(V)
    has_entropy_grad = grad_entropy is not None
    _token_logprobs_bwd_kernel[(n,)](
        rows, labels, lse, entropy if has_entropy_grad else lse, grad_logp,
        grad_entropy if has_entropy_grad else grad_logp, grad_logits,
        V, T, rows.stride(0), rows.stride(1), 1.0 / temperature, ignore_index,
        HAS_ENTROPY_GRAD=has_entropy_grad, ACC=_dispatch.tl_acc_dtype(rows.dtype), BLOCK_V=block,
        num_warps=_dispatch.num_warps(block),
    )  # fmt: skip
    return grad_logits


# Chunked torch path: at most this many logits are expanded to the accumulation dtype at once
# (a few temporaries of this size live at the same time: 8 MiB each in fp32).
_TORCH_CHUNK_ELEMENTS = 1 << 21


def _torch_chunks(rows):
    """Yields (flat_start, flat_end, chunk (R, V) view) over the rows of a (B, T, V) tensor."""
    B, T, V = rows.shape
    step = max(1, _TORCH_CHUNK_ELEMENTS // V)
    for b in range(B):
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            yield b * T + t0, b * T + t1, rows[b, t0:t1]


def _torch_forward(rows, labels, temperature, ignore_index, return_entropy):
    _, _, V = rows.shape
    n = labels.numel()
    acc = _dispatch.acc_dtype(rows.dtype)
    logp = torch.empty(n, dtype=acc, device=rows.device)
    lse = torch.empty(n, dtype=acc, device=rows.device)
    entropy = torch.empty(n, dtype=acc, device=rows.device) if return_entropy else None
    for start, end, chunk in _torch_chunks(rows):
        lab = labels[start:end]
        valid = lab != ignore_index  # (R,)
        z = chunk.to(acc) / temperature  # (R, V)
        lse_c = torch.logsumexp(z, dim=-1)  # (R,)
        z_label = z.gather(-1, torch.where(valid, lab, 0).unsqueeze(-1)).squeeze(-1)
        logp[start:end] = torch.where(valid, z_label - lse_c, 0.0)
        lse[start:end] = torch.where(valid, lse_c, 0.0)
        if entropy is not None:
            log_p = z.sub_(lse_c.unsqueeze(-1))  # (R, V), reuses z
            p = log_p.exp()
            ent = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
            entropy[start:end] = torch.where(valid, ent, 0.0)
    return logp, entropy, lse


def _torch_backward(rows, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    _, _, V = rows.shape
    n = labels.numel()
    acc = _dispatch.acc_dtype(rows.dtype)
    grad_logits = torch.empty(n, V, dtype=rows.dtype, device=rows.device)  # (N, V)
    for start, end, chunk in _torch_chunks(rows):
        lab = labels[start:end]
        valid = (lab != ignore_index).unsqueeze(-1)  # (R, 1)
        log_p = chunk.to(acc) / temperature - lse[start:end].unsqueeze(-1)  # (R, V)
        p = log_p.exp()
        g = (grad_logp[start:end] / temperature).unsqueeze(-1)  # (R, 1)
        grad = -g * p
        grad.scatter_add_(-1, torch.where(valid, lab.unsqueeze(-1), 0), torch.where(valid, g, 0.0))
        if grad_entropy is not None:
            h = (grad_entropy[start:end] / temperature).unsqueeze(-1)
            grad -= h * torch.where(p > 0, p * (log_p + entropy[start:end].unsqueeze(-1)), 0.0)
        grad_logits[start:end] = torch.where(valid, grad, 0.0)
    return grad_logits


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, backend):
        rows = _dispatch.as_rows(logits)  # (B, T, V)
        flat_labels = labels.reshape(-1).contiguous()  # (N,); the kernels index it densely
        impl = _triton_forward if backend == "triton" else _torch_forward
        logp, entropy, lse = impl(rows, flat_labels, temperature, ignore_index, return_entropy)
        ctx.save_for_backward(rows, flat_labels, lse, entropy)
        ctx.logits_shape = logits.shape
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        out_shape = logits.shape[:-1]
        if entropy is None:
            return logp.view(out_shape)
        return logp.view(out_shape), entropy.view(out_shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        rows, labels, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.reshape(-1).to(lse.dtype)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(-1).to(lse.dtype)
        impl = _triton_backward if ctx.backend == "triton" else _torch_backward
        grad_logits = impl(
            rows, labels, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            ctx.temperature, ctx.ignore_index,
        )  # fmt: skip
        return grad_logits.view(ctx.logits_shape), None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[labels] per token, fp32; optionally also the entropy.

    logits: (N, V) or (B, T, V), fp32/bf16/fp16 (fp64 gives fp64 outputs, for gradcheck).
    labels: integer tensor of shape logits.shape[:-1]; `ignore_index` rows give 0 and no gradient.
    backend: None (dispatch by device and TRITON_INTERPRET), "triton" or "torch".
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _dispatch.acc_dtype(logits.dtype)  # rejects non-float logits
    resolved = _dispatch.resolve_backend(backend, logits)
    return _TokenLogprobs.apply(logits, labels, float(temperature), int(ignore_index), bool(return_entropy), resolved)
