"""kl_penalty's k1/k2/k3 estimators against the formulas written out here (k3 as in verl)."""

from __future__ import annotations

import pytest
import torch

from rlhf_loop import kernels

BACKENDS = ["triton", "torch"]


def reference(logp, ref_logp, estimator):
    """verl's kl_penalty: k1 "kl", k2 "mse", k3 "low_var_kl" (with its clamps), in float64."""
    logp, ref_logp = logp.double(), ref_logp.double()
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    kl = torch.clamp(ref_logp - logp, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def make_case(shape, dtype, seed):
    """Log-probs with ref - logp spread over [-30, 30], so every clamp of k3 is hit."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 5
    delta = torch.empty(shape, dtype=torch.float64).uniform_(-30, 30, generator=gen)
    spots = torch.tensor([-25.0, -15.0, -5.0, -1.0, 0.0, 0.5, 2.0, 25.0], dtype=torch.float64)
    delta.view(-1)[: spots.numel()] = spots[: delta.numel()]
    return logp.to(dtype), (logp + delta).to(dtype), gen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_forward_backward(run_op, estimator, dtype, backend):
    logp, ref_logp, gen = make_case((5, 67), dtype, seed=1)
    g = torch.randn(5, 67, generator=gen)
    (out,), (grad_logp,) = run_op(
        backend, "kl_penalty", (logp, ref_logp, estimator), {}, grad_args=(0,), grad_outputs=(g,)
    )
    assert out.dtype == torch.float32 and out.shape == logp.shape
    ref = reference(logp, ref_logp, estimator)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    x = logp.detach().double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad((reference(x, ref_logp, estimator) * g.double()).sum(), x)
    assert grad_logp.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=1.6e-2)
    torch.testing.assert_close(grad_logp.double(), ref_grad, **tol)
    if estimator == "k3":
        r = (ref_logp.double() - logp.double()).clamp(-20, 20)
        clamped = ((ref_logp.double() - logp.double()).abs() > 20) | (r.exp() - r - 1 > 10)
        assert bool(clamped.any() and (~clamped).any())
        assert bool((grad_logp[clamped] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grad_wrt_ref_logp(run_op, estimator, backend):
    logp, ref_logp, gen = make_case((300,), torch.float32, seed=2)
    g = torch.randn(300, generator=gen)
    _, (grad_logp, grad_ref) = run_op(
        backend, "kl_penalty", (logp, ref_logp, estimator), {}, grad_args=(0, 1), grad_outputs=(g,)
    )
    x, y = logp.double().requires_grad_(True), ref_logp.double().requires_grad_(True)
    ref_gx, ref_gy = torch.autograd.grad((reference(x, y, estimator) * g.double()).sum(), (x, y))
    torch.testing.assert_close(grad_logp.double(), ref_gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ref.double(), ref_gy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_gradcheck_float64(run_gradcheck, estimator, backend):
    """Inside k3's clamps (|ref - logp| < 2), where the estimator is smooth."""
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    ref_logp = logp + torch.empty(3, 5, dtype=torch.float64).uniform_(-2, 2, generator=gen)
    assert run_gradcheck(backend, "kl_penalty", (logp, ref_logp, estimator), {}, (0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_around_the_block(run_op, backend):
    """Element counts below, at and above one 1024-element block (masking of the tail)."""
    for n in (1, 1023, 1024, 1025, 3001):
        logp, ref_logp, _ = make_case((n,), torch.float32, seed=n)
        (out,), _ = run_op(backend, "kl_penalty", (logp, ref_logp, "k3"), {})
        torch.testing.assert_close(out.double(), reference(logp, ref_logp, "k3"), atol=1e-5, rtol=1e-5)


def test_argument_checks():
    logp = torch.zeros(3)
    with pytest.raises(ValueError, match="estimator"):
        kernels.kl_penalty(logp, logp, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kernels.kl_penalty(logp, torch.zeros(4))
