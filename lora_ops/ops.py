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


def _shrink_impl(x, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                 adapter_rank, num_slices, chunk_size, backend):
    if backend == "torch_native":
        return torch_native.sgmv_shrink(x, weights, token_adapter, adapter_rank, num_slices)
    return _kernels(backend).shrink.sgmv_shrink(
        x, weights, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
        num_slices, chunk_size, permuted=backend == "csgmv",
    )


def _expand_impl(base_output, y, weights, token_adapter, token_order, chunk_adapter, chunk_start,
                 chunk_len, adapter_rank, adapter_scaling, slice_offsets, chunk_size, backend):
    slice_offsets = [int(offset) for offset in slice_offsets]
    if backend == "torch_native":
        torch_native.sgmv_expand(base_output, y, weights, token_adapter, adapter_rank,
                                 adapter_scaling, slice_offsets)
        return
    _kernels(backend).expand.sgmv_expand(
        y, weights, base_output, token_order, chunk_adapter, chunk_start, chunk_len,
        adapter_rank, adapter_scaling, slice_offsets, chunk_size, permuted=backend == "csgmv",
    )


def _qkv_expand_impl(base_output, y, weights, *args):
    *metadata, q_size, kv_size, chunk_size, backend = args  # metadata: plan + adapter_scaling
    offsets = [0, q_size, q_size + kv_size, q_size + 2 * kv_size]
    _expand_impl(base_output, y, weights, *metadata, offsets, chunk_size, backend)


def _gate_up_expand_impl(base_output, y, weights, *args):
    *metadata, chunk_size, backend = args
    half = base_output.shape[1] // 2
    _expand_impl(base_output, y, weights, *metadata, [0, half, 2 * half], chunk_size, backend)


def _embedding_a_impl(token_ids, weights, token_adapter, adapter_rank, backend):
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
    checks.check_tensor(op, "x", x, 2)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_like(op, "weights", weights, "x", x)
    checks.check_batch(op, batch, "x", x, weights)
    checks.check_dim(op, "weights.shape[2] (in features) must match x.shape[1]", weights.shape[2], x.shape[1])
    if not isinstance(num_slices, int) or num_slices < 1 or weights.shape[1] % num_slices:
        checks.fail(op, f"num_slices must be a positive int dividing weights.shape[1] = {weights.shape[1]}, got {num_slices}")
    checks.check_rank(op, batch, weights.shape[1] // num_slices, "weights.shape[1] // num_slices")
    name = resolve(backend, x.device, x.dtype, batch)
    return torch.ops.lora.sgmv_shrink(x, weights, *_plan_args(batch, name), num_slices,
                                      batch.plan(name).chunk_size, name)


def _check_expand(op: str, y, weights, batch: LoRABatch, base_output, num_slices: int) -> None:
    checks.check_tensor(op, "base_output", base_output, 2)
    checks.check_tensor(op, "y", y, 2)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_like(op, "y", y, "base_output", base_output)
    checks.check_like(op, "weights", weights, "base_output", base_output)
    checks.check_batch(op, batch, "base_output", base_output, weights)
    checks.check_dim(op, "y.shape[0] (tokens) must match base_output.shape[0]", y.shape[0], base_output.shape[0])
    checks.check_dim(op, "weights.shape[1] (out features) must match base_output.shape[1]", weights.shape[1], base_output.shape[1])
    checks.check_dim(op, f"y.shape[1] must be {num_slices} slices x weights.shape[2] (R)", y.shape[1], num_slices * weights.shape[2])
    checks.check_rank(op, batch, weights.shape[2], "weights.shape[2]")


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
        slice_offsets: ``[0, o_1, ..., out]``, strictly increasing: slice ``i`` is columns
            ``[o_i, o_{i+1})`` of ``base_output`` and rows of ``weights``.
        backend: as in ``sgmv_shrink``.
    """
    op = "sgmv_expand"
    checks.check_tensor(op, "base_output", base_output, 2)
    checks.check_slice_offsets(op, slice_offsets, base_output.shape[1])
    _check_expand(op, y, weights, batch, base_output, len(slice_offsets) - 1)
    name = resolve(backend, base_output.device, base_output.dtype, batch)
    torch.ops.lora.sgmv_expand(base_output, y, weights, *_plan_args(batch, name),
                               batch.adapter_scaling, list(slice_offsets),
                               batch.plan(name).chunk_size, name)


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
    op = "qkv_expand"
    checks.check_tensor(op, "base_output", base_output, 2)
    if q_size <= 0 or kv_size <= 0 or q_size + 2 * kv_size != base_output.shape[1]:
        checks.fail(op, f"q_size + 2*kv_size must equal base_output.shape[1] = {base_output.shape[1]} "
                         f"with both positive, got q_size={q_size}, kv_size={kv_size}")
    _check_expand(op, y, weights, batch, base_output, 3)
    name = resolve(backend, base_output.device, base_output.dtype, batch)
    torch.ops.lora.qkv_expand(base_output, y, weights, *_plan_args(batch, name),
                              batch.adapter_scaling, q_size, kv_size,
                              batch.plan(name).chunk_size, name)


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
    op = "gate_up_expand"
    checks.check_tensor(op, "base_output", base_output, 2)
    if base_output.shape[1] % 2:
        checks.fail(op, f"base_output.shape[1] must be even (gate and up halves), got {base_output.shape[1]}")
    _check_expand(op, y, weights, batch, base_output, 2)
    name = resolve(backend, base_output.device, base_output.dtype, batch)
    torch.ops.lora.gate_up_expand(base_output, y, weights, *_plan_args(batch, name),
                                  batch.adapter_scaling, batch.plan(name).chunk_size, name)


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
    checks.check_tensor(op, "weights", weights, 3)
    if weights.device != token_ids.device:
        checks.fail(op, f"weights must be on the device of token_ids ({token_ids.device}), got {weights.device}")
    checks.check_batch(op, batch, "token_ids", token_ids, weights)
    checks.check_rank(op, batch, weights.shape[1], "weights.shape[1]")
    checks.check_token_ids_in_range(op, token_ids, weights.shape[2])
    name = resolve(backend, weights.device, weights.dtype, batch)
    return torch.ops.lora.embedding_a(token_ids, weights, batch.token_adapter, batch.adapter_rank, name)
