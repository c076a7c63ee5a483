"""full_kl against kl_div of two log_softmaxes, forward and backward, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_loop import kernels
from rlhf_loop.kernels import kl_full as kl_full_mod

BACKENDS = ["triton", "torch"]
OUT_TOL = dict(atol=5e-5, rtol=1e-5)
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2)}


def reference(logits, ref_logits, temperature=1.0):
    """KL(p || q) per token = kl_div(log q, log p, log_target=True) summed over V, in float64."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def reference_grads(logits, ref_logits, g, temperature=1.0):
    x = logits.detach().double().requires_grad_(True)
    y = ref_logits.detach().double().requires_grad_(True)
    return torch.autograd.grad((reference(x, y, temperature) * g.double()).sum(), (x, y))


def make_case(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    ref_logits = logits + torch.randn(shape, generator=gen, dtype=torch.float64)  # a nearby policy
    return logits.to(dtype), ref_logits.to(dtype), gen


SHAPES = {7: ((37, 7), 1), 1000: ((3, 7, 1000), 2), 50257: ((5, 50257), 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [7, 1000, 50257])
def test_forward_backward(run_op, V, dtype, temperature, backend):
    shape, seed = SHAPES[V]
    logits, ref_logits, gen = make_case(shape, dtype, seed)
    if V == 50257:
        logits[1, 0] = 14.0  # policy row max in the first block
        ref_logits[2, V - 1] = 14.0  # reference row max in the tail block
    g = torch.randn(shape[:-1], generator=gen)
    (kl,), (grad,) = run_op(
        backend, "full_kl", (logits, ref_logits), dict(temperature=temperature), grad_args=(0,), grad_outputs=(g,)
    )
    assert kl.dtype == torch.float32 and kl.shape == shape[:-1]
    torch.testing.assert_close(kl.double(), reference(logits, ref_logits, temperature), **OUT_TOL)
    assert grad.dtype == dtype and grad.shape == logits.shape
    ref_grad, _ = reference_grads(logits, ref_logits, g, temperature)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_wrt_ref_logits(run_op, backend):
    logits, ref_logits, gen = make_case((2, 5, 1000), torch.float32, seed=4)
    g = torch.randn(2, 5, generator=gen)
    _, (grad_x, grad_y) = run_op(
        backend, "full_kl", (logits, ref_logits), dict(temperature=1.5), grad_args=(0, 1), grad_outputs=(g,)
    )
    ref_gx, ref_gy = reference_grads(logits, ref_logits, g, 1.5)
    torch.testing.assert_close(grad_x.double(), ref_gx, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(grad_y.double(), ref_gy, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_and_masked_rows(run_op, backend):
    """KL(p || p) = 0; a vocabulary entry at -inf in both rows contributes nothing (also when a
    whole 4096-column block of a row is -inf); -inf only in the reference row gives +inf."""
    gen = torch.Generator().manual_seed(5)
    V = 5000
    logits = torch.randn(4, V, generator=gen)
    ref_logits = logits.clone()
    ref_logits[1] += torch.randn(V, generator=gen)
    logits[:2, ::9] = float("-inf")
    ref_logits[:2, ::9] = float("-inf")
    logits[2, :4096] = float("-inf")
    ref_logits[2, :4096] = float("-inf")
    ref_logits[3, 17] = float("-inf")
    g = torch.randn(4, generator=gen)
    (kl,), (grad,) = run_op(backend, "full_kl", (logits, ref_logits), {}, grad_args=(0,), grad_outputs=(g,))
    assert abs(float(kl[0])) < 1e-5 and abs(float(kl[2])) < 1e-5
    finite = torch.isfinite(logits[1])  # kl_div itself gives nan for 0 * (-inf - -inf)
    torch.testing.assert_close(kl[1].double(), reference(logits[1, finite], ref_logits[1, finite]), **OUT_TOL)
    assert float(kl[3]) == float("inf")
    assert bool(torch.isfinite(grad[:3]).all()) and bool((grad[:2, ::9] == 0).all())
    ref_grad, _ = reference_grads(logits[1, finite], ref_logits[1, finite], g[1])
    torch.testing.assert_close(grad[1, finite].double(), ref_grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(run_op, backend):
    logits, ref_logits, gen = make_case((2, 9, 1000), torch.bfloat16, seed=6)
    x, y = logits[:, :-1], ref_logits[:, 1:].contiguous()  # different strides on the two sides
    assert x.stride() != y.stride()
    g = torch.randn(2, 8, generator=gen)
    (kl,), (grad,) = run_op(backend, "full_kl", (x, y), {}, grad_args=(0,), grad_outputs=(g,))
    torch.testing.assert_close(kl.double(), reference(x, y), **OUT_TOL)
    torch.testing.assert_close(grad.double(), reference_grads(x, y, g)[0], **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(run_gradcheck, backend):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    ref_logits = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    assert run_gradcheck(backend, "full_kl", (logits, ref_logits), dict(temperature=0.9), (0, 1))


def test_torch_path_chunks_rows(monkeypatch):
    logits, ref_logits, gen = make_case((3, 10, 50), torch.float32, seed=8)
    g = torch.randn(3, 10, generator=gen)
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((kernels.full_kl(x, ref_logits, backend="torch") * g).sum(), x)
    monkeypatch.setattr(kl_full_mod, "_TORCH_CHUNK_ELEMENTS", 150)  # 3 rows per chunk
    y = logits.clone().requires_grad_(True)
    kl2 = kernels.full_kl(y, ref_logits, backend="torch")
    (grad2,) = torch.autograd.grad((kl2 * g).sum(), y)
    torch.testing.assert_close(kl2, kernels.full_kl(logits, ref_logits, backend="torch"))
    torch.testing.assert_close(grad2, grad)


def test_argument_checks():
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match="same shape"):
        kernels.full_kl(x, torch.randn(4, 8))
    with pytest.raises(ValueError, match="temperature"):
        kernels.full_kl(x, x, temperature=-1.0)
