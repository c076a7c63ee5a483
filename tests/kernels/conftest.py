"""Harness for the kernels/ tests: run an op on one backend, forward and backward.

* backend "torch": the op's chunked torch path, in this process, on CPU.
* backend "triton": the Triton kernels. With CUDA, in this process on the GPU. Without CUDA,
  through Triton's interpreter in one spawned worker process that sets TRITON_INTERPRET=1
  before it imports triton: Triton fixes interpreter mode at import time (its own
  @triton.jit helpers are decorated then), and doing it in a worker keeps the variable out of
  this process, so tests collected later still get the default CPU dispatch and the result
  does not depend on which test imported triton first.

Test files use the `run_op`, `run_gradcheck` and `worker_backend_for_cpu` fixtures.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import Runner, call_gradcheck, call_op, resolved_backend_for_cpu_tensor


@pytest.fixture(scope="session")
def _runner():
    runner = Runner()
    yield runner
    runner.close()


@pytest.fixture
def run_op(_runner):
    """run_op(backend, op_name, args, kwargs=None, grad_args=(), grad_outputs=()) -> (outputs, grads)."""

    def run(backend, op_name, args, kwargs=None, grad_args=(), grad_outputs=()):
        kwargs = {**(kwargs or {}), "backend": backend}
        if backend == "torch":
            return call_op(op_name, args, kwargs, grad_args, grad_outputs, "cpu")
        return _runner.call(call_op, op_name, args, kwargs, grad_args, grad_outputs)

    return run


@pytest.fixture
def run_gradcheck(_runner):
    """run_gradcheck(backend, op_name, args, kwargs, grad_args) -> True or raises."""

    def run(backend, op_name, args, kwargs, grad_args):
        kwargs = {**kwargs, "backend": backend}
        if backend == "torch":
            return call_gradcheck(op_name, args, kwargs, grad_args, "cpu")
        return _runner.call(call_gradcheck, op_name, args, kwargs, grad_args)

    return run


@pytest.fixture
def worker_backend_for_cpu(_runner) -> str:
    """`backend=None` dispatch for a CPU tensor inside the TRITON_INTERPRET=1 worker."""
    if torch.cuda.is_available():
        pytest.skip("CUDA run: the Triton kernels run in-process, no interpreter worker")
    return _runner.worker().apply(resolved_backend_for_cpu_tensor)
