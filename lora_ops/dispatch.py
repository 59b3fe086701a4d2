"""Which code runs an op, and why: the one place that decides.

``resolve`` turns a request (a backend name, the ``use_backend`` default, or ``"auto"``) plus the
op, the weights and the batch into a ``Decision``: the backend, the chunk plan it walks and the
kernel family. ``explain`` returns the same decision with a human-readable reason. The decision
reaches the op as string arguments (``backend``, ``kernel``), so ``torch.compile`` guards on it
and a CUDA graph records the kernels that were asked for; nothing inside an op reads a global.

Backends declare what they support as data (``BACKEND_INFO``); a request no backend can serve
raises ``BackendError`` listing every backend with the reason it was rejected.

The rules (deterministic; the kernel family from device, dtype and tensor sizes only, so it
holds for every batch of the same sizes and a CUDA graph replays it safely):

- backend ``auto``: CPU tensors -> ``torch_native``. CUDA tensors -> ``csgmv`` when sorting the
  tokens by adapter needs fewer chunks than cutting them in token order (decode batches, and
  batches whose sequences interleave adapters), else ``triton`` (long segments, no permutation):
  ``batch.prefers_adapter_sorting``. A per-step batch (``LoRABatch.build``) sets it from its
  contents. A fixed-capacity batch (``LoRABatch.empty``, for CUDA graphs and ``torch.compile``)
  sets it once, from its plans' static sizes (the worst case of any contents: decode buckets,
  one token per sequence, sort; buckets of few long sequences keep token order), so a graph
  replays, and a compiled function runs, the backend chosen at capture or trace with any later
  contents. Both backends are exact for any contents; the choice is only about speed.
- plan: ``triton`` walks the segment plan (token order), ``csgmv`` the adapter-sorted plan;
  ``torch_native`` reads only the per-token adapter ids.
- kernel family of the Triton backends (measured on an H200 in bf16, Llama-3-8B shapes; numbers
  in ``bench_results/NOTES.md``): the ``per_token`` GEMV kernels when the batch is small or the
  plan has as many chunks as tokens (one-token segments re-read the weights per token anyway),
  else the ``chunk`` kernels over the plan. Shrink: per token up to 4096 outputs
  (tokens x ``num_slices * R``); expand: per token up to 16 tokens. ``embedding_a`` has one kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

BACKENDS = ("torch_native", "triton", "csgmv")
AUTO = "auto"
OPS = ("sgmv_shrink", "sgmv_expand", "qkv_expand", "gate_up_expand", "embedding_a")

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# Below these sizes the per-token kernels beat the chunk kernels (see the module docstring).
SHRINK_PER_TOKEN_MAX_OUTPUTS = 4096
EXPAND_PER_TOKEN_MAX_TOKENS = 16


@dataclass(frozen=True)
class BackendInfo:
    name: str
    purpose: str
    dtypes: frozenset
    needs_triton: bool
    cuda_graph_safe: bool
    plan: str | None  # the LoRABatch chunk plan it walks: "segment", "sorted" or None


BACKEND_INFO = {
    "torch_native": BackendInfo(
        "torch_native", "readable plain-PyTorch reference; the CPU path", _FLOAT_DTYPES,
        needs_triton=False,
        cuda_graph_safe=False,  # loops over adapters with data-dependent indexing (host syncs)
        plan=None,
    ),
    "triton": BackendInfo(
        "triton", "segment-parallel Triton kernels over runs of one adapter, in token order",
        _FLOAT_DTYPES, needs_triton=True, cuda_graph_safe=True, plan="segment",
    ),
    "csgmv": BackendInfo(
        "csgmv", "chunked SGMV: tokens sorted by adapter and cut into fixed-size chunks",
        _FLOAT_DTYPES, needs_triton=True, cuda_graph_safe=True, plan="sorted",
    ),
}


class Decision(NamedTuple):  # a tuple: cheap to build on every call
    """What runs an op for one batch: backend, chunk plan, kernel family, and why."""

    op: str
    backend: str  # torch_native, triton or csgmv
    plan: str | None  # segment, sorted, or None (torch_native)
    kernel: str  # torch (torch_native), chunk or per_token (matmul ops), gather (embedding_a)
    reason: str

    def __str__(self) -> str:
        plan = f", {self.plan} plan" if self.plan else ""
        return f"{self.op}: {self.backend}{plan}, {self.kernel} kernel -- {self.reason}"


class BackendError(ValueError):
    """No backend can run the given tensors, or the name is unknown."""


# Looked up once at import: torch.compile cannot trace importlib.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_default_backend = AUTO


def rejection_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run tensors of this device and dtype, or None if it can."""
    info = BACKEND_INFO[backend]
    if dtype not in info.dtypes:
        return f"dtype {dtype} not supported (expects one of float16, bfloat16, float32)"
    kind = device.type  # read once: each read builds a string (host time on every call)
    if info.needs_triton:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)"
        if kind not in ("cpu", "cuda"):
            return f"needs CUDA tensors, got device {device}"
    elif kind not in ("cpu", "cuda"):
        return f"runs on CPU or CUDA tensors, got device {device}"
    return None


def _unknown(kind: str, name, choices) -> BackendError:
    return BackendError(f"unknown {kind} {name!r}; choices: {', '.join(choices)}")


def _pick_backend(requested: str, device: torch.device, batch, why: bool) -> tuple[str, str]:
    if requested != AUTO:
        return requested, "requested"
    if device.type != "cuda":
        return "torch_native", why and "auto: tensors are not on a GPU"
    counts = why and _chunk_counts(batch)
    if batch.prefers_adapter_sorting:
        return "csgmv", why and f"auto: sorting by adapter needs fewer chunks ({counts})"
    return "triton", why and f"auto: token order needs no permutation and no more chunks ({counts})"


def _chunk_counts(batch) -> str:
    sorted_plan, segment_plan = batch.sorted_plan, batch.segment_plan
    if batch.is_fixed_capacity:
        return (f"fixed-capacity batch, decided by its sizes: at most {sorted_plan.num_chunks} chunks "
                f"sorted by adapter, {segment_plan.num_chunks} in token order")
    return f"{sorted_plan.chunks_needed} chunks sorted by adapter, {segment_plan.chunks_needed} in token order"


def _pick_kernel(op: str, backend: str, batch, weights: torch.Tensor, why: bool) -> tuple[str, str]:
    if backend == "torch_native":
        return "torch", "plain PyTorch, one adapter at a time"
    if op == "embedding_a":
        return "gather", "one kernel"
    num_tokens = batch.num_tokens
    num_chunks = batch.plan(BACKEND_INFO[backend].plan).num_chunks
    if num_chunks >= num_tokens:
        return "per_token", why and f"the plan has as many chunks ({num_chunks}) as tokens ({num_tokens})"
    if op == "sgmv_shrink":
        outputs = num_tokens * weights.shape[1]
        if outputs <= SHRINK_PER_TOKEN_MAX_OUTPUTS:
            return "per_token", why and f"{outputs} outputs <= {SHRINK_PER_TOKEN_MAX_OUTPUTS}"
        return "chunk", why and f"{outputs} outputs > {SHRINK_PER_TOKEN_MAX_OUTPUTS}"
    if num_tokens <= EXPAND_PER_TOKEN_MAX_TOKENS:
        return "per_token", why and f"{num_tokens} tokens <= {EXPAND_PER_TOKEN_MAX_TOKENS}"
    return "chunk", why and f"{num_tokens} tokens > {EXPAND_PER_TOKEN_MAX_TOKENS}"


def resolve(op: str, batch, weights: torch.Tensor, backend: str | None = None,
            why: bool = False) -> Decision:
    """The decision for ``op`` on ``batch`` with these weights (device, dtype and sizes), or raise.

    ``backend``: a backend name, ``"auto"``, or None for the ``use_backend`` default. The reason
    text is built only when ``why`` is set (the ops' hot path skips it).
    """
    requested = _default_backend if backend is None else backend
    if requested != AUTO and requested not in BACKENDS:
        raise _unknown("backend", requested, (*BACKENDS, repr(AUTO)))
    device, dtype = weights.device, weights.dtype
    name, backend_reason = _pick_backend(requested, device, batch, why)
    rejected = rejection_reason(name, device, dtype)
    if rejected is not None:
        lines = [f"backend {name!r} cannot run {dtype} tensors on {device}; the choices:"]
        for choice in BACKENDS:
            reason = rejection_reason(choice, device, dtype)
            lines.append(f"  {choice}: {'available' if reason is None else 'rejected, ' + reason}")
        raise BackendError("\n".join(lines))
    kernel, kernel_reason = _pick_kernel(op, name, batch, weights, why)
    reason = f"{backend_reason}; {kernel_reason}" if why else ""
    return Decision(op, name, BACKEND_INFO[name].plan, kernel, reason)


def explain(op: str, batch, weights: torch.Tensor, backend: str | None = None) -> Decision:
    """What runs ``op`` for this batch and these weights, and why (``print`` it).

    ``weights`` is the op's weight tensor (its device, dtype and shape decide); the decision is
    the one the op's Python function makes with the same arguments.
    """
    if op not in OPS:
        raise _unknown("op", op, OPS)
    return resolve(op, batch, weights, backend, why=True)


@contextlib.contextmanager
def use_backend(backend: str):
    """Set the backend used by calls that pass ``backend=None`` inside the block.

    A module global rather than a context variable, so ``torch.compile`` can guard on it.
    """
    global _default_backend
    if backend != AUTO and backend not in BACKENDS:
        raise _unknown("backend", backend, (*BACKENDS, repr(AUTO)))
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous
