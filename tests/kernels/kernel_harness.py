"""Worker-side helpers for the kernels/ tests (see conftest.py).

They live in this uniquely named module, not in conftest.py: pytest imports every
conftest.py outside a package as the module `conftest`, so functions pickled by reference
from there would resolve to another folder's conftest in the spawned worker.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings

import torch


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter evaluates both sides of tl.where with numpy (e.g. 0 * -inf on masked lanes).
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    torch.set_num_threads(1)
    from triton.runtime.interpreter import InterpretedFunction

    import rlhf_loop.kernels.logprobs
    from rlhf_loop import kernels

    if not isinstance(kernels.logprobs._token_logprobs_fwd_kernel, InterpretedFunction):
        raise RuntimeError("worker imported triton outside interpreter mode")


def call_op(op_name, args, kwargs, grad_args, grad_outputs, device):
    """Run kernels.<op_name>(*args, **kwargs) on `device`; backprop `grad_outputs`.

    grad_args: indices of `args` to differentiate w.r.t.; grad_outputs: one tensor or None
    per output (None = that output is not in the loss). Returns (outputs, grads) on CPU.
    """
    from rlhf_loop import kernels

    args = [a.detach().to(device) if torch.is_tensor(a) else a for a in args]
    for i in grad_args:
        args[i].requires_grad_(True)
    out = getattr(kernels, op_name)(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if grad_args:
        used = [(o, g.to(device)) for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
        grads = torch.autograd.grad([o for o, _ in used], [args[i] for i in grad_args], [g for _, g in used])
    return tuple(o.detach().cpu() for o in outs), tuple(g.cpu() for g in grads)


def call_gradcheck(op_name, args, kwargs, grad_args, device):
    """torch.autograd.gradcheck of kernels.<op_name> w.r.t. args[grad_args] (float64 inputs)."""
    from rlhf_loop import kernels

    args = [a.detach().to(device) if torch.is_tensor(a) else a for a in args]
    for i in grad_args:
        args[i].requires_grad_(True)

    def fn(*diff):
        full = list(args)
        for i, d in zip(grad_args, diff, strict=True):
            full[i] = d
        return getattr(kernels, op_name)(*full, **kwargs)

    return torch.autograd.gradcheck(fn, tuple(args[i] for i in grad_args), eps=1e-6, atol=1e-5, rtol=1e-4)


def resolved_backend_for_cpu_tensor() -> str:
    """What `backend=None` picks for a CPU tensor in the calling process."""
    from rlhf_loop.kernels import _dispatch

    return _dispatch.resolve_backend(None, torch.zeros(1))


class Runner:
    def __init__(self) -> None:
        self._pool = None

    def _triton_device(self) -> str | None:
        return "cuda" if torch.cuda.is_available() else None

    def worker(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1, initializer=_worker_init)
        return self._pool

    def call(self, fn, *args):
        """Run fn(*args) where the Triton kernels run: this process on CUDA, else the worker."""
        device = self._triton_device()
        if device is not None:
            return fn(*args, device)
        return self.worker().apply(fn, (*args, "cpu"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
