"""Compile every Triton kernel ahead of time for sm_90 (H100/H200), without a GPU.

The interpreter runs the kernels as numpy code, so it misses what only the compiler checks
(loop-carried types, constexpr branches, scalar/block mixes, fp64 math). Here each kernel,
in each constexpr variant the launchers use, goes through Triton's full pipeline down to
cubin with the bundled ptxas. With the divisibility-by-16 facts the JIT derives at launch
for V, strides and pointers, the forward's logit loads must come out as 16-byte vector loads.
"""

from __future__ import annotations

import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from rlhf_loop.kernels import kl, kl_full, logprobs

TARGET = GPUTarget("cuda", 90, 32)

pytestmark = pytest.mark.skipif(
    isinstance(logprobs._token_logprobs_fwd_kernel, InterpretedFunction),
    reason="this process imported triton with TRITON_INTERPRET=1; its kernels cannot be compiled",
)


def _acc(acc):
    return "*fp64" if acc == tl.float64 else "*fp32"


def _lp_fwd_sig(acc):
    a = _acc(acc)
    return {
        "logits_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": a, "entropy_ptr": a, "lse_ptr": a,
        "V": "i32", "T": "i32", "stride_b": "i64", "stride_t": "i32", "inv_temperature": "fp32",
        "ignore_index": "i32", "RETURN_ENTROPY": "constexpr", "ACC": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip


def _lp_bwd_sig(acc):
    a = _acc(acc)
    return {
        "logits_ptr": "*bf16", "labels_ptr": "*i64", "lse_ptr": a, "entropy_ptr": a, "grad_logp_ptr": a,
        "grad_entropy_ptr": a, "grad_logits_ptr": "*bf16", "V": "i32", "T": "i32", "stride_b": "i64",
        "stride_t": "i32", "inv_temperature": "fp32", "ignore_index": "i32", "HAS_ENTROPY_GRAD": "constexpr",
        "ACC": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip


def _klp_sig(acc, backward):
    a = _acc(acc)
    ptrs = {"logp_ptr": "*fp32", "ref_ptr": "*bf16"}
    ptrs |= {"grad_out_ptr": a, "grad_logp_ptr": a} if backward else {"out_ptr": a}
    return ptrs | {"n": "i32", "ESTIMATOR": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}


def _full_kl_sig(acc, backward):
    a = _acc(acc)
    sig = {"logits_ptr": "*bf16", "ref_ptr": "*bf16", "kl_ptr": a, "lse_p_ptr": a, "lse_q_ptr": a}
    if backward:
        sig |= {"grad_kl_ptr": a, "grad_logits_ptr": "*bf16", "grad_ref_ptr": "*bf16"}
    sig |= {
        "V": "i32", "T": "i32", "stride_b": "i64", "stride_t": "i32", "ref_stride_b": "i64",
        "ref_stride_t": "i32", "inv_temperature": "fp32",
    }  # fmt: skip
    if backward:
        sig["REF_GRAD"] = "constexpr"
    return sig | {"ACC": "constexpr", "BLOCK_V": "constexpr"}


def _cases():
    for acc in (tl.float32, tl.float64):
        name = "fp32" if acc == tl.float32 else "fp64"
        for flag in (False, True):
            yield f"logprobs_fwd-{name}-entropy={flag}", logprobs._token_logprobs_fwd_kernel, _lp_fwd_sig(acc), {
                "RETURN_ENTROPY": flag, "ACC": acc, "BLOCK_V": 4096}  # fmt: skip
            yield f"logprobs_bwd-{name}-entropy={flag}", logprobs._token_logprobs_bwd_kernel, _lp_bwd_sig(acc), {
                "HAS_ENTROPY_GRAD": flag, "ACC": acc, "BLOCK_V": 4096}  # fmt: skip
            yield f"full_kl_bwd-{name}-ref_grad={flag}", kl_full._full_kl_bwd_kernel, _full_kl_sig(acc, True), {
                "REF_GRAD": flag, "ACC": acc, "BLOCK_V": 4096}  # fmt: skip
        yield f"full_kl_fwd-{name}", kl_full._full_kl_fwd_kernel, _full_kl_sig(acc, False), {"ACC": acc, "BLOCK_V": 4096}
        for est in (1, 2, 3):
            const = {"ESTIMATOR": est, "ACC": acc, "BLOCK": 1024}
            yield f"kl_penalty_fwd-{name}-k{est}", kl._kl_penalty_fwd_kernel, _klp_sig(acc, False), const
            yield f"kl_penalty_bwd-{name}-k{est}", kl._kl_penalty_bwd_kernel, _klp_sig(acc, True), const


CASES = list(_cases())


def _compile(kernel, signature, constexprs, divisible=()):
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": 8})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("kernel", "signature", "constexprs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_compiles_for_sm90(kernel, signature, constexprs):
    compiled = _compile(kernel, signature, constexprs)
    assert compiled.asm["cubin"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_forward_loads_are_vectorized():
    divisible = ["logits_ptr", "labels_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "V", "stride_b", "stride_t"]
    compiled = _compile(
        logprobs._token_logprobs_fwd_kernel, _lp_fwd_sig(tl.float32),
        {"RETURN_ENTROPY": True, "ACC": tl.float32, "BLOCK_V": 4096}, divisible,
    )  # fmt: skip
    assert re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"])
