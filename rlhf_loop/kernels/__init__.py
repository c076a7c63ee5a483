"""Fused kernels for the RLHF trainer: per-token log-probs/entropy and KL, forward and backward.

See docs/kernels.md. Every op takes ``backend=None | "triton" | "torch"``; with None, CUDA
tensors run Triton, CPU tensors run Triton's interpreter when TRITON_INTERPRET=1, else a
chunked torch path.
"""

from rlhf_loop.kernels.kl_full import full_kl
from rlhf_loop.kernels.kl import kl_penalty
from rlhf_loop.kernels.logprobs import token_logprobs

__all__ = ["full_kl", "kl_penalty", "token_logprobs"]
