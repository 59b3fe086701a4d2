"""The op contracts of lora_ops: every ``torch.ops.lora.*`` schema, fake and kernel registration.

Importing this module registers the ops; it must be imported before any graph capture (``import
lora_ops`` does it). Triton backends are imported lazily, the first time one runs.

Conventions shared by every op and every backend (DESIGN.md has the math):

- Shrink weights ``A (L, n*R, in)``: slice ``i`` of slot ``l`` in rows ``[i*R, i*R + r_l)``.
  Expand weights ``B (L, out, R)``: columns ``[:r_l]``. Embedding weights ``A (L, R, vocab)``.
- ``R`` (max rank) comes from the weight shapes; ``r_l`` (rank per slot, 0 = unused) from
  ``adapter_rank``. Tokens whose ``token_adapter`` is -1 get no LoRA.
- The scaling ``c_l`` is applied in the expand ops, never in shrink.
- Shrink returns ``y`` with zeros beyond each adapter's rank and for tokens without adapter.
- Expand ops add into ``base_output`` in place (``Tensor(a!)``) and return nothing.
- The metadata tensors come from a ``LoRABatch``: ``token_adapter`` and the chunk plan of the
  backend named by ``backend`` (``batch.plan(backend)``); ``backend`` is already resolved
  (``torch_native``, ``triton`` or ``csgmv``, never ``auto``).
"""

from __future__ import annotations

import torch

from . import checks, torch_native
from .backends import resolve
from .batch import LoRABatch

_PLAN = (
    "Tensor token_adapter, Tensor token_order, Tensor chunk_adapter, Tensor chunk_start, "
    "Tensor chunk_len, Tensor adapter_rank"
)

SCHEMAS = {
    "sgmv_shrink": (
        f"sgmv_shrink(Tensor x, Tensor weights, {_PLAN}, int num_slices, int chunk_size, "
        "str backend) -> Tensor"
    ),
    "sgmv_expand": (
        f"sgmv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_PLAN}, "
        "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, str backend) -> ()"
    ),
    "qkv_expand": (
        f"qkv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_PLAN}, "
        "Tensor adapter_scaling, SymInt q_size, SymInt kv_size, int chunk_size, str backend) -> ()"
    ),
    "gate_up_expand": (
        f"gate_up_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_PLAN}, "
        "Tensor adapter_scaling, int chunk_size, str backend) -> ()"
    ),
    "embedding_a": (
        "embedding_a(Tensor token_ids, Tensor weights, Tensor token_adapter, Tensor adapter_rank, "
        "str backend) -> Tensor"
    ),
}

_lib = torch.library.Library("lora", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))


# ---- fake (meta) implementations: output shapes, dtypes and strides for tracing ----


@torch.library.register_fake("lora::sgmv_shrink", lib=_lib)
def _shrink_fake(x, weights, *plan_and_sizes):
    return x.new_empty(x.shape[0], weights.shape[1])


@torch.library.register_fake("lora::embedding_a", lib=_lib)
def _embedding_a_fake(token_ids, weights, token_adapter, adapter_rank, backend):
    return weights.new_empty(token_ids.shape[0], weights.shape[1])


def _expand_fake(*args):
    return None


for _name in ("sgmv_expand", "qkv_expand", "gate_up_expand"):
    torch.library.register_fake(f"lora::{_name}", _expand_fake, lib=_lib)


# ---- real implementations (CPU and CUDA): switch on the resolved backend ----


def _kernels(backend: str):
    """The Triton kernel package, imported on first use; rejects unknown backend names."""
    if backend not in ("triton", "csgmv"):
        raise ValueError(f"backend must be 'torch_native', 'triton' or 'csgmv', got {backend!r}")
    import csrc_triton.embedding
    import csrc_triton.expand
    import csrc_triton.shrink

    return csrc_triton


def _shrink_impl(x, weights, *args):
    *metadata, num_slices, chunk_size, backend = args
    checks.check_shrink("sgmv_shrink", x, weights, metadata, num_slices)
    if backend == "torch_native":
        token_adapter, adapter_rank = metadata[0], metadata[-1]
        return torch_native.sgmv_shrink(x, weights, token_adapter, adapter_rank, num_slices)
    return _kernels(backend).shrink.sgmv_shrink(
        x, weights, *metadata, num_slices, chunk_size, permuted=backend == "csgmv")


def _run_expand(op, base_output, y, weights, metadata, adapter_scaling, slice_offsets, chunk_size,
                backend):
    slice_offsets = [int(offset) for offset in slice_offsets]
    checks.check_expand(op, base_output, y, weights, metadata, adapter_scaling, slice_offsets)
    if backend == "torch_native":
        token_adapter, adapter_rank = metadata[0], metadata[-1]
        torch_native.sgmv_expand(base_output, y, weights, token_adapter, adapter_rank,
                                 adapter_scaling, slice_offsets)
        return
    _kernels(backend).expand.sgmv_expand(
        y, weights, base_output, *metadata, adapter_scaling, slice_offsets, chunk_size,
        permuted=backend == "csgmv")


# Expand impls: args = the 6 metadata tensors, adapter_scaling, the slice sizes, chunk_size, backend.
def _expand_impl(base_output, y, weights, *args):
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend = args
    _run_expand("sgmv_expand", base_output, y, weights, metadata, adapter_scaling, slice_offsets,
                chunk_size, backend)


def _qkv_expand_impl(base_output, y, weights, *args):
    *metadata, adapter_scaling, q_size, kv_size, chunk_size, backend = args
    checks.check_qkv_sizes("qkv_expand", base_output, q_size, kv_size)
    offsets = [0, q_size, q_size + kv_size, q_size + 2 * kv_size]
    _run_expand("qkv_expand", base_output, y, weights, metadata, adapter_scaling, offsets,
                chunk_size, backend)


def _gate_up_expand_impl(base_output, y, weights, *args):
    *metadata, adapter_scaling, chunk_size, backend = args
    checks.check_gate_up_width("gate_up_expand", base_output)
    half = base_output.shape[1] // 2
    _run_expand("gate_up_expand", base_output, y, weights, metadata, adapter_scaling,
                [0, half, 2 * half], chunk_size, backend)


def _embedding_a_impl(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_embedding("embedding_a", token_ids, weights, token_adapter, adapter_rank)
    if backend == "torch_native":
        return torch_native.embedding_a(token_ids, weights, token_adapter, adapter_rank)
    return _kernels(backend).embedding.embedding_a(token_ids, weights, token_adapter, adapter_rank)


_IMPLS = {
    "sgmv_shrink": _shrink_impl,
    "sgmv_expand": _expand_impl,
    "qkv_expand": _qkv_expand_impl,
    "gate_up_expand": _gate_up_expand_impl,
    "embedding_a": _embedding_a_impl,
}
for _name, _impl in _IMPLS.items():
    for _device in ("CPU", "CUDA"):
        _lib.impl(_name, _impl, _device)


# ---- the Python API: typed wrappers that check arguments and resolve the backend ----


def _plan_args(batch: LoRABatch, backend: str) -> tuple:
    plan = batch.plan(backend)
    return (batch.token_adapter, plan.token_order, plan.chunk_adapter, plan.chunk_start,
            plan.chunk_len, batch.adapter_rank)


def _resolve_for(op: str, name: str, tensor, batch: LoRABatch, backend: str | None, **kwargs) -> str:
    """Check the tensor that decides device and dtype, then resolve the backend for it."""
    checks.check_tensor(op, name, tensor, **kwargs)
    checks.check_batch_device(op, batch, name, tensor)
    return resolve(backend, tensor.device, tensor.dtype, batch)


def sgmv_shrink(
    x: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    num_slices: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """LoRA A for every token with its own adapter: ``y[t, i*R:i*R+r] = x[t] @ A[a(t), i*R:i*R+r].T``.

    Args:
        x: ``(s, in)`` activations, float16/bfloat16/float32.
        weights: ``(L, num_slices*R, in)`` stacked A matrices, ``x``'s dtype and device.
        batch: the forward's ``LoRABatch`` (``s`` tokens, ``L`` slots).
        num_slices: slices stacked in ``weights`` (3 for q/k/v, 2 for gate/up).
        backend: ``torch_native``, ``triton``, ``csgmv``, ``auto``, or None for the
            ``use_backend`` default (``auto`` unless set).

    Returns:
        ``y (s, num_slices*R)``, zero beyond each adapter's rank and for tokens without adapter.
    """
    op = "sgmv_shrink"
    name = _resolve_for(op, "x", x, batch, backend, ndim=2)
    metadata = _plan_args(batch, name)
    checks.check_shrink(op, x, weights, metadata, num_slices)
    checks.check_rank(op, batch, weights.shape[1] // num_slices, "weights.shape[1] // num_slices")
    return torch.ops.lora.sgmv_shrink(x, weights, *metadata, num_slices,
                                      batch.plan(name).chunk_size, name)


def _expand(op: str, y, weights, batch: LoRABatch, base_output, slice_offsets, backend,
            slice_args: tuple) -> None:
    """Shared by the expand wrappers: checks, then the op named ``op`` with its slice args."""
    name = _resolve_for(op, "base_output", base_output, batch, backend, ndim=2)
    metadata = _plan_args(batch, name)
    checks.check_expand(op, base_output, y, weights, metadata, batch.adapter_scaling, slice_offsets)
    checks.check_rank(op, batch, weights.shape[2], "weights.shape[2]")
    getattr(torch.ops.lora, op)(base_output, y, weights, *metadata, batch.adapter_scaling,
                                *slice_args, batch.plan(name).chunk_size, name)


def sgmv_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    slice_offsets: list[int],
    backend: str | None = None,
) -> None:
    """LoRA B, added in place: ``base_output[t, o_i:o_{i+1}] += c * y[t, i*R:i*R+r] @ B[a(t), o_i:o_{i+1}, :r].T``.

    Args:
        y: ``(s, n*R)`` shrink output, ``n = len(slice_offsets) - 1``.
        weights: ``(L, out, R)`` stacked B matrices.
        batch: the forward's ``LoRABatch``.
        base_output: ``(s, out)`` output of the base layer, updated in place.
        slice_offsets: ``[0, o_1, ..., out]``, strictly increasing, 1 to 3 slices: slice ``i`` is columns
            ``[o_i, o_{i+1})`` of ``base_output`` and rows of ``weights``.
        backend: as in ``sgmv_shrink``.
    """
    _expand("sgmv_expand", y, weights, batch, base_output, slice_offsets, backend,
            (list(slice_offsets),))


def qkv_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    q_size: int,
    kv_size: int,
    backend: str | None = None,
) -> None:
    """``sgmv_expand`` with the three slices q, k, v of widths ``q_size, kv_size, kv_size``.

    Shapes: ``y (s, 3R)``, ``weights (L, q_size + 2*kv_size, R)``, ``base_output (s, q_size + 2*kv_size)``.
    """
    checks.check_tensor("qkv_expand", "base_output", base_output, 2)
    checks.check_qkv_sizes("qkv_expand", base_output, q_size, kv_size)
    offsets = [0, q_size, q_size + kv_size, q_size + 2 * kv_size]
    _expand("qkv_expand", y, weights, batch, base_output, offsets, backend, (q_size, kv_size))


def gate_up_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    backend: str | None = None,
) -> None:
    """``sgmv_expand`` with two equal slices (gate, up).

    Shapes: ``y (s, 2R)``, ``weights (L, 2*inter, R)``, ``base_output (s, 2*inter)``.
    """
    checks.check_tensor("gate_up_expand", "base_output", base_output, 2)
    checks.check_gate_up_width("gate_up_expand", base_output)
    half = base_output.shape[1] // 2
    _expand("gate_up_expand", y, weights, batch, base_output, [0, half, 2 * half], backend, ())


def embedding_a(
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    backend: str | None = None,
) -> torch.Tensor:
    """LoRA A of an embedding: ``y[t, :r] = A[a(t), :r, token_ids[t]]``.

    Args:
        token_ids: ``(s,)`` int32/int64 token ids in ``[0, vocab)`` (checked eagerly, outside
            ``torch.compile`` and CUDA-graph capture).
        weights: ``(L, R, vocab)``.
        batch: the forward's ``LoRABatch``.

    Returns:
        ``y (s, R)`` in the weights' dtype, zero beyond each rank and for tokens without adapter.
    """
    op = "embedding_a"
    checks.check_tensor(op, "token_ids", token_ids, 1, dtypes=(torch.int32, torch.int64))
    name = _resolve_for(op, "weights", weights, batch, backend, ndim=3)
    checks.check_embedding(op, token_ids, weights, batch.token_adapter, batch.adapter_rank)
    checks.check_rank(op, batch, weights.shape[1], "weights.shape[1]")
    checks.check_token_ids_in_range(op, token_ids, weights.shape[2])
    return torch.ops.lora.embedding_a(token_ids, weights, batch.token_adapter, batch.adapter_rank, name)
