"""Backend selection shared by the ops in `kernels/`.

Rule (read at call time, per call):

* ``backend="triton"`` / ``backend="torch"`` forces a backend.
* ``backend=None``: CUDA tensors run the Triton kernels; CPU tensors run the
  Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` is in
  the environment; otherwise CPU tensors run the op's chunked torch path.

Triton decides interpreter mode when ``triton`` is imported (its own
``@triton.jit`` helpers such as ``tl.zeros`` are decorated then), so running
the Triton kernels on CPU tensors only works when ``TRITON_INTERPRET=1`` was
set before ``triton`` was first imported. `require_launchable` turns the
opposite case into a clear error instead of a CUDA driver failure.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BACKENDS = ("triton", "torch")


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose main input is `tensor`."""
    if backend is None:
        if tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def require_launchable(kernel: object, tensor: torch.Tensor) -> None:
    """Raise if `kernel` cannot run on `tensor`'s device."""
    if tensor.is_cuda or isinstance(kernel, InterpretedFunction):
        return
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors, or Triton's interpreter for {tensor.device} "
        "tensors: set TRITON_INTERPRET=1 before `triton` is first imported, or pass backend='torch'"
    )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float64 for float64 inputs, float32 otherwise."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"expected a floating-point tensor (fp32, bf16, fp16, fp64), got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton counterpart of `acc_dtype`, passed to kernels as a constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_v(vocab: int) -> int:
    """Vocabulary block per loop iteration of the row kernels (also used in the interpreter)."""
    return min(triton.next_power_of_2(vocab), 4096)


def num_warps(block: int) -> int:
    """Warps per row program: 4 at every block size.

    Chosen on an H200 by bench/kernel_variants.py (N = 16,384 bf16 rows, V 32,000 and 151,936): at
    the 4,096 block, 4 warps read the logits at 79 % of the datasheet bandwidth (token_logprobs) and
    67-68 % (full_kl) against 67-71 % and 55-56 % with 8; 16 warps were slower still
    (bench/results/kernel-variants-nvidia-h200.json, docs/kernels.md).
    """
    return 4


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View (..., V) logits as (B, T, V) without copying when the input is (N, V) or (B, T, V).

    Row r of the flattened (B*T, V) problem lives at ``(r // T) * stride(0) + (r % T) * stride(1)``,
    so slices such as ``logits[:, :-1]`` are read in place. Inputs with more than three dims, or a
    non-unit vocabulary stride, are copied.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    if logits.dim() == 2:
        rows = logits.unsqueeze(0)
    elif logits.dim() == 3:
        rows = logits
    else:
        rows = logits.reshape(-1, *logits.shape[-2:])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows  # (B, T, V)
