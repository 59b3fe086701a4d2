"""The dispatch key: which implementation runs an op.

Backends are data (what each supports); ``resolve`` is the one place that turns a request —
an explicit name, the ``use_backend`` default, or ``"auto"`` — into a backend name, and when
nothing fits it raises an error listing every backend with the reason it was rejected.

The resolved name reaches each op as a string argument, so ``torch.compile`` guards on it and a
CUDA graph records the backend that was asked for. Nothing inside an op reads a global.

The ``auto`` rule (deterministic, from device, dtype and batch shape only):

- CPU tensors: ``torch_native``.
- CUDA tensors: ``csgmv`` when the batch has more segments (runs of tokens with one adapter, in
  token order) than chunks in its adapter-sorted plan would need, i.e. when sorting by adapter
  removes work: decode batches and batches whose sequences interleave adapters. Otherwise
  ``triton``: its segments are already long, and it needs no permutation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch_native", "triton", "csgmv")
AUTO = "auto"

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


@dataclass(frozen=True)
class BackendInfo:
    name: str
    purpose: str
    dtypes: frozenset
    needs_triton: bool
    cuda_graph_safe: bool


BACKEND_INFO = {
    "torch_native": BackendInfo(
        "torch_native",
        "readable plain-PyTorch reference; the CPU path",
        _FLOAT_DTYPES,
        needs_triton=False,
        cuda_graph_safe=False,  # loops over adapters with data-dependent indexing (host syncs)
    ),
    "triton": BackendInfo(
        "triton",
        "segment-parallel Triton kernels: one program per (segment chunk, N tile), token order",
        _FLOAT_DTYPES,
        needs_triton=True,
        cuda_graph_safe=True,
    ),
    "csgmv": BackendInfo(
        "csgmv",
        "chunked SGMV: tokens sorted by adapter and cut into fixed-size chunks",
        _FLOAT_DTYPES,
        needs_triton=True,
        cuda_graph_safe=True,
    ),
}

_default_backend = AUTO


class BackendError(ValueError):
    """No backend can run the given tensors, or the name is unknown."""


# Looked up once at import: torch.compile cannot trace importlib.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def rejection_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run tensors of this device and dtype, or None if it can."""
    info = BACKEND_INFO[backend]
    if dtype not in info.dtypes:
        return f"dtype {dtype} not supported (expects one of float16, bfloat16, float32)"
    if info.needs_triton:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)"
        if device.type not in ("cpu", "cuda"):
            return f"needs CUDA tensors, got device {device}"
    elif device.type not in ("cpu", "cuda"):
        return f"runs on CPU or CUDA tensors, got device {device}"
    return None


def _auto(device: torch.device, batch) -> str:
    if device.type != "cuda":
        return "torch_native"
    return "csgmv" if batch.prefers_adapter_sorting else "triton"


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype, batch) -> str:
    """Turn a backend request into a backend name that can run these tensors, or raise."""
    requested = _default_backend if backend is None else backend
    if requested == AUTO:
        requested = _auto(device, batch)
    elif requested not in BACKENDS:
        raise BackendError(
            f"unknown backend {requested!r}; choices: {', '.join(BACKENDS)} or {AUTO!r}"
        )
    reason = rejection_reason(requested, device, dtype)
    if reason is None:
        return requested
    lines = [f"backend {requested!r} cannot run {dtype} tensors on {device}; the choices:"]
    for name in BACKENDS:
        why = rejection_reason(name, device, dtype)
        lines.append(f"  {name}: {'available' if why is None else 'rejected, ' + why}")
    raise BackendError("\n".join(lines))


@contextlib.contextmanager
def use_backend(backend: str):
    """Set the backend used by calls that pass ``backend=None`` inside the block.

    A module global rather than a context variable, so ``torch.compile`` can guard on it.
    """
    global _default_backend
    if backend != AUTO and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choices: {', '.join(BACKENDS)} or {AUTO!r}")
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous
