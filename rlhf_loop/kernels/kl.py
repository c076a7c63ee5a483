"""Per-token KL penalty estimators used in RLHF, from the sampled tokens' log-probs.

    kl_penalty(logp, ref_logp, estimator="k1", *, backend=None)

`logp` and `ref_logp` are log pi(a_t) and log pi_ref(a_t) of the sampled tokens, same shape
(any), fp32/bf16/fp16 (fp64 gives fp64). Returns the per-token estimate of KL(pi || pi_ref) in
fp32, same shape, differentiable w.r.t. `logp` (and `ref_logp`, should it require grad):

    k1 = logp - ref_logp
    k2 = 0.5 * (logp - ref_logp) ** 2
    k3 = clamp(exp(r) - r - 1, -10, 10),  r = clamp(ref_logp - logp, -20, 20)   (verl "low_var_kl")

The clamps follow torch.clamp's gradient: zero where a clamp is active (value outside the
closed interval). For the exact KL over the whole vocabulary see `kernels.full_kl`.

Dispatch as for every op in `kernels/` (CUDA -> Triton, CPU -> Triton interpreter under
TRITON_INTERPRET=1, else torch). The torch path is the formula itself: the op is elementwise
over tokens, so it has no vocabulary-sized memory to bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_loop.kernels import _dispatch

_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
_BLOCK = 1024

# Formula, per token with d = logp - ref:
#   k1 = d                        d k1 / d logp = 1
#   k2 = d^2 / 2                  d k2 / d logp = d
#   k3 = clamp(e^r - r - 1, -10, 10), r = clamp(-d, -20, 20)
#                                 d k3 / d logp = 1 - e^r where both clamps are inactive, else 0
# Every estimator depends on d only, so d / d ref = -d / d logp.
# Traps: int64 offsets; math in fp32 whatever the input dtype; the gradient mask uses closed
# intervals (torch.clamp passes the gradient at the bounds).


@triton.jit
def _kl_penalty_fwd_kernel(
    logp_ptr,  # (n,)
    ref_ptr,  # (n,)
    out_ptr,  # (n,) ACC
    n,
    ESTIMATOR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ESTIMATOR == 1:
        out = logp - ref
    elif ESTIMATOR == 2:
        out = 0.5 * (logp - ref) * (logp - ref)
    else:
        r = tl.minimum(tl.maximum(ref - logp, -20.0), 20.0)
        out = tl.minimum(tl.maximum(tl.exp(r) - r - 1.0, -10.0), 10.0)
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def _kl_penalty_bwd_kernel(
    logp_ptr,  # (n,)
    ref_ptr,  # (n,)
    grad_out_ptr,  # (n,) ACC
    grad_logp_ptr,  # (n,) ACC
    n,
    ESTIMATOR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0)
    if ESTIMATOR == 1:
        grad = g
    elif ESTIMATOR == 2:
        grad = g * (logp - ref)
    else:
        r_raw = ref - logp
        r = tl.minimum(tl.maximum(r_raw, -20.0), 20.0)
        kld = tl.exp(r) - r - 1.0
        active = (r_raw >= -20.0) & (r_raw <= 20.0) & (kld >= -10.0) & (kld <= 10.0)
        grad = tl.where(active, g * (1.0 - tl.exp(r)), 0.0)
    tl.store(grad_logp_ptr + offs, grad, mask=mask)


def _triton_forward(logp, ref_logp, estimator_id, acc):
    _dispatch.require_launchable(_kl_penalty_fwd_kernel, logp)
    n = logp.numel()
    out = torch.empty(n, dtype=acc, device=logp.device)
    if n > 0:
        _kl_penalty_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            logp, ref_logp, out, n,
            ESTIMATOR=estimator_id, ACC=_dispatch.tl_acc_dtype(acc), BLOCK=_BLOCK,
        )  # fmt: skip
    return out


def _triton_backward(logp, ref_logp, grad_out, estimator_id, acc):
    n = logp.numel()
    grad = torch.empty(n, dtype=acc, device=logp.device)
    if n > 0:
        _kl_penalty_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            logp, ref_logp, grad_out, grad, n,
            ESTIMATOR=estimator_id, ACC=_dispatch.tl_acc_dtype(acc), BLOCK=_BLOCK,
        )  # fmt: skip
    return grad


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator_id, acc):
        flat_logp = logp.reshape(-1).contiguous()  # (n,)
        flat_ref = ref_logp.reshape(-1).contiguous()  # (n,)
        out = _triton_forward(flat_logp, flat_ref, estimator_id, acc)
        ctx.save_for_backward(flat_logp, flat_ref)
        ctx.estimator_id = estimator_id
        ctx.acc = acc
        ctx.shape = logp.shape
        ctx.dtypes = (logp.dtype, ref_logp.dtype)
        return out.view(logp.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat_logp, flat_ref = ctx.saved_tensors
        grad_out = grad_out.reshape(-1).to(ctx.acc).contiguous()
        grad = _triton_backward(flat_logp, flat_ref, grad_out, ctx.estimator_id, ctx.acc).view(ctx.shape)
        grad_logp = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_ref = (-grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_logp, grad_ref, None, None


def _torch_kl_penalty(logp, ref_logp, estimator, acc):
    logp = logp.to(acc)
    ref_logp = ref_logp.to(acc)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    r = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(r) - r - 1.0, min=-10.0, max=10.0)


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k1",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate ("k1", "k2" or "k3" with verl's clamps), fp32, shape of `logp`."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    if logp.device != ref_logp.device:
        raise ValueError(f"logp is on {logp.device} but ref_logp is on {ref_logp.device}")
    acc = _dispatch.acc_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    if _dispatch.resolve_backend(backend, logp) == "torch":
        return _torch_kl_penalty(logp, ref_logp, estimator, acc)
    return _KLPenalty.apply(logp, ref_logp, _ESTIMATORS[estimator], acc)
