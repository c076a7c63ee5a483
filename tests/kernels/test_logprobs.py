"""token_logprobs (and its entropy) against the plain eager formula, on both backends.

The "triton" backend runs the Triton kernels themselves: on CUDA when there is one, else
through Triton's interpreter in a worker process (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_loop import kernels
from rlhf_loop.kernels import _dispatch
from rlhf_loop.kernels import logprobs as logprobs_mod

BACKENDS = ["triton", "torch"]
IGNORE = -100

# Outputs are computed in fp32 from the same (rounded) inputs the reference sees, so their
# tolerance does not depend on the input dtype; gradients are returned in the logits dtype.
OUT_TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-6, rtol=1.6e-2),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
}


def reference(logits, labels, temperature=1.0, ignore_index=IGNORE):
    """Eager log_softmax + gather, entropy from the full distribution, in float64."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)  # (..., V)
    valid = labels != ignore_index
    logp = log_probs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    p = log_probs.exp()
    entropy = -(p * torch.where(p > 0, log_probs, 0.0)).sum(-1)  # 0 log 0 = 0 for -inf logits
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def reference_grad(logits, labels, grad_logp, grad_entropy, temperature=1.0, ignore_index=IGNORE):
    x = logits.detach().double().requires_grad_(True)
    logp, entropy = reference(x, labels, temperature, ignore_index)
    loss = (logp * grad_logp.double()).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def make_case(shape, dtype, seed, ignore_frac=0.25, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    V = shape[-1]
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, shape[:-1], generator=gen)
    flat = labels.view(-1)
    flat[torch.rand(flat.shape, generator=gen) < ignore_frac] = IGNORE
    flat[0] = IGNORE
    flat[-1] = int(torch.randint(0, V, (1,), generator=gen))
    return logits, labels, gen


# (shape, seed): rows are not powers of two; V=50257 is 12 full blocks of 4096 and a tail.
SHAPES = {7: ((37, 7), 1), 1000: ((3, 7, 1000), 2), 50257: ((5, 50257), 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [7, 1000, 50257])
def test_forward_backward(run_op, V, dtype, return_entropy, temperature, backend):
    shape, seed = SHAPES[V]
    logits, labels, gen = make_case(shape, dtype, seed)
    if V == 50257:
        # The row max sits in the first block for one row and in the tail block for another,
        # so the online rescaling across blocks is exercised both ways.
        logits[1, 0] = 12.0
        logits[2, V - 1] = 12.0
    g_logp = torch.randn(shape[:-1], generator=gen)
    g_ent = torch.randn(shape[:-1], generator=gen) if return_entropy else None
    (outs, (grad,)) = run_op(
        backend, "token_logprobs", (logits, labels),
        dict(temperature=temperature, return_entropy=return_entropy),
        grad_args=(0,), grad_outputs=(g_logp, g_ent) if return_entropy else (g_logp,),
    )  # fmt: skip
    ref_logp, ref_ent = reference(logits, labels, temperature)
    assert len(outs) == (2 if return_entropy else 1)
    assert outs[0].dtype == torch.float32 and outs[0].shape == labels.shape
    torch.testing.assert_close(outs[0].double(), ref_logp, **OUT_TOL)
    if return_entropy:
        assert outs[1].dtype == torch.float32 and outs[1].shape == labels.shape
        torch.testing.assert_close(outs[1].double(), ref_ent, **OUT_TOL)
    ignored = labels == IGNORE
    assert bool((outs[0][ignored] == 0).all())
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert bool((grad[ignored] == 0).all())
    ref = reference_grad(logits, labels, g_logp, g_ent, temperature)
    torch.testing.assert_close(grad.double(), ref, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_input(run_op, backend):
    logits, labels, gen = make_case((2, 9, 1000), torch.float16, seed=4)
    g_logp, g_ent = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    (logp, ent), (grad,) = run_op(
        backend, "token_logprobs", (logits, labels), dict(return_entropy=True, temperature=1.3),
        grad_args=(0,), grad_outputs=(g_logp, g_ent),
    )  # fmt: skip
    ref_logp, ref_ent = reference(logits, labels, 1.3)
    torch.testing.assert_close(logp.double(), ref_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), ref_ent, **OUT_TOL)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.double(), reference_grad(logits, labels, g_logp, g_ent, 1.3), **GRAD_TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logp_only", "entropy_only"])
def test_one_output_in_the_loss(run_op, backend, used):
    logits, labels, gen = make_case((11, 1000), torch.float32, seed=5)
    g = torch.randn(11, generator=gen)
    grad_outputs = (g, None) if used == "logp_only" else (None, g)
    _, (grad,) = run_op(
        backend, "token_logprobs", (logits, labels), dict(return_entropy=True),
        grad_args=(0,), grad_outputs=grad_outputs,
    )  # fmt: skip
    zero = torch.zeros_like(g)
    ref = reference_grad(logits, labels, *((g, None) if used == "logp_only" else (zero, g)))
    torch.testing.assert_close(grad.double(), ref, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(run_op, backend):
    """A real token id as ignore_index (e.g. the pad id): its rows are skipped, others not."""
    logits, _, gen = make_case((40, 7), torch.float32, seed=6)
    labels = torch.randint(0, 7, (40,), generator=gen)
    labels[:3] = 3
    g = torch.randn(40, generator=gen)
    (logp, ent), (grad,) = run_op(
        backend, "token_logprobs", (logits, labels), dict(ignore_index=3, return_entropy=True),
        grad_args=(0,), grad_outputs=(g, g),
    )  # fmt: skip
    ref_logp, ref_ent = reference(logits, labels, ignore_index=3)
    torch.testing.assert_close(logp.double(), ref_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), ref_ent, **OUT_TOL)
    assert bool((logp[labels == 3] == 0).all()) and bool((grad[labels == 3] == 0).all())
    torch.testing.assert_close(grad.double(), reference_grad(logits, labels, g, g, ignore_index=3), **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_read_in_place(run_op, backend):
    """logits[:, :-1] (the usual causal shift) and a vocabulary-strided tensor."""
    full, labels_full, gen = make_case((3, 9, 1000), torch.bfloat16, seed=7)
    shifted, labels = full[:, :-1], labels_full[:, 1:]
    assert not shifted.is_contiguous()
    g = torch.randn(3, 8, generator=gen)
    (logp,), (grad,) = run_op(backend, "token_logprobs", (shifted, labels), {}, grad_args=(0,), grad_outputs=(g,))
    torch.testing.assert_close(logp.double(), reference(shifted, labels)[0], **OUT_TOL)
    torch.testing.assert_close(grad.double(), reference_grad(shifted, labels, g, None), **GRAD_TOL[torch.bfloat16])

    transposed = torch.randn(1000, 6, generator=gen).t()  # (6, 1000), stride(-1) == 6
    labels2 = torch.randint(0, 1000, (12,), generator=gen)[::2]  # strided labels
    (logp2,), _ = run_op(backend, "token_logprobs", (transposed, labels2), {})
    torch.testing.assert_close(logp2.double(), reference(transposed, labels2)[0], **OUT_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(run_op, backend):
    """Large magnitudes stay finite; -inf logits (masked vocabulary) get p = 0 and zero gradient,
    also when a whole vocabulary block of a row is -inf (here the first 4096 columns of row 1)."""
    V = 5000
    logits, labels, gen = make_case((6, V), torch.float32, seed=8, ignore_frac=0.0, scale=300.0)
    masked = torch.zeros(6, V, dtype=torch.bool)
    masked[:, ::7] = True
    masked[1, :4096] = True
    logits[masked] = float("-inf")
    labels = torch.where(labels % 7 == 0, labels + 1, labels)
    labels[1] = 4100
    g_logp, g_ent = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    (logp, ent), (grad,) = run_op(
        backend, "token_logprobs", (logits, labels), dict(return_entropy=True, temperature=3.0),
        grad_args=(0,), grad_outputs=(g_logp, g_ent),
    )  # fmt: skip
    assert bool(torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all())
    ref_logp, ref_ent = reference(logits, labels, 3.0)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-5)
    assert bool((grad[masked] == 0).all())
    torch.testing.assert_close(grad.double(), reference_grad(logits, labels, g_logp, g_ent, 3.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(run_gradcheck, backend):
    """float64 logits give float64 outputs, so gradcheck runs on both backends (fp64 in the interpreter)."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, IGNORE, 6], [0, 3, 2]])
    kw = dict(temperature=0.8, return_entropy=True)
    assert run_gradcheck(backend, "token_logprobs", (logits, labels), kw, (0,))


def test_torch_path_chunks_rows(monkeypatch):
    """The torch path's row chunking (also across the B dim) gives the same result as one chunk."""
    logits, labels, gen = make_case((3, 10, 50), torch.float32, seed=10)
    g = torch.randn(3, 10, generator=gen)
    x = logits.clone().requires_grad_(True)
    logp, ent = kernels.token_logprobs(x, labels, return_entropy=True, backend="torch")
    (grad,) = torch.autograd.grad((logp * g + ent).sum(), x)
    monkeypatch.setattr(logprobs_mod, "_TORCH_CHUNK_ELEMENTS", 150)  # 3 rows per chunk
    y = logits.clone().requires_grad_(True)
    logp2, ent2 = kernels.token_logprobs(y, labels, return_entropy=True, backend="torch")
    (grad2,) = torch.autograd.grad((logp2 * g + ent2).sum(), y)
    torch.testing.assert_close(logp2, logp)
    torch.testing.assert_close(ent2, ent)
    torch.testing.assert_close(grad2, grad)


def test_dispatch(monkeypatch):
    """CPU tensors: torch path by default, Triton when TRITON_INTERPRET=1 at call time."""

    class TritonCalled(Exception):
        pass

    def spy(*args):
        raise TritonCalled

    monkeypatch.setattr(logprobs_mod, "_triton_forward", spy)
    logits, labels, _ = make_case((4, 7), torch.float32, seed=11)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.token_logprobs(logits, labels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TritonCalled):
        kernels.token_logprobs(logits, labels)
    kernels.token_logprobs(logits, labels, backend="torch")
    with pytest.raises(TritonCalled):
        kernels.token_logprobs(logits, labels, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kernels.token_logprobs(logits, labels, backend="cuda")


def test_worker_dispatches_to_triton_from_env(worker_backend_for_cpu):
    assert worker_backend_for_cpu == "triton"


def test_triton_on_cpu_without_interpreter_is_an_error():
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(logprobs_mod._token_logprobs_fwd_kernel, InterpretedFunction):
        pytest.skip("this process imported triton with TRITON_INTERPRET=1, so CPU launches are valid here")
    logits, labels, _ = make_case((4, 7), torch.float32, seed=12)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.token_logprobs(logits, labels, backend="triton")


def test_argument_checks():
    logits = torch.randn(4, 7)
    with pytest.raises(ValueError, match="labels shape"):
        kernels.token_logprobs(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        kernels.token_logprobs(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.token_logprobs(torch.zeros(4, 7, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)


def test_block_size_is_a_power_of_two_capped_at_4096():
    assert _dispatch.block_v(7) == 8 and _dispatch.block_v(1000) == 1024 and _dispatch.block_v(151936) == 4096
