"""Pytest-only test machinery: the Triton interpreter switch, GPU markers, backend lists and the
kernel-family fixture. Scenarios, the op table, references and the tolerance rule live in
``lora_ops.testing`` (shared with the benchmark) and are re-exported here for the test files.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
any kernel module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

import lora_ops  # noqa: E402, F401  (registers the ops before any test runs)
from lora_ops.testing import (  # noqa: E402, F401  (re-exported for the test files)
    OP_CASES, SCENARIOS, Dims, OpCase, RecordLoraCalls, Scenario, assert_close_to_reference, embedding_reference,
    error_and_bound, expand_reference, fresh_generator, make_batch, shrink_reference,
)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device machine)")


def kernel_backends() -> list[str]:
    """The Triton backends, when they can run here (GPU, or the interpreter on CPU)."""
    return ["triton", "csgmv"] if HAS_TRITON else []


@pytest.fixture(params=["chunk", "per_token"])
def matmul_kernels(request, monkeypatch):
    """Runs a test once per kernel family of the Triton backends' shrink and expand: the chunk
    kernels over the plan, and the per-token kernels that the size rule picks for small
    decode batches (forced here whatever the size)."""
    force_matmul_kernels(monkeypatch, per_token=request.param == "per_token")
    return request.param


def force_matmul_kernels(monkeypatch, per_token: bool) -> None:
    """Makes the resolver pick one kernel family for the Triton backends' shrink and expand."""
    import lora_ops.dispatch

    family = "per_token" if per_token else "chunk"
    pick = lora_ops.dispatch._pick_kernel

    def forced(op, backend, batch, weights, why):
        if backend == "torch_native" or op == "embedding_a":
            return pick(op, backend, batch, weights, why)
        return family, "forced by the test"

    monkeypatch.setattr(lora_ops.dispatch, "_pick_kernel", forced)


def backends_for(dtype: torch.dtype, device: str = DEVICE) -> list[str]:
    # bfloat16 tl.dot is wrong in Triton's CPU interpreter: kernels get bf16 only on the GPU.
    if device == "cpu" and dtype == torch.bfloat16:
        return ["torch_native"]
    return ["torch_native", *kernel_backends()]


def capture_op(op_case, inputs, batch, backend):
    """(graph, its output) of one op call captured in a CUDA graph, after an eager call that
    compiles the kernels (a capture must not compile)."""
    op_case.run(inputs, batch, backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op_case.run(inputs, batch, backend)
    return graph, out
