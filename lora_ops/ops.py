"""The op contracts of lora_ops: every ``torch.ops.lora.*`` op, one block each.

A block holds the op's schema, its fake (output shapes for tracing; it runs the same argument
check as the real implementation, so a wrong shape fails while tracing, not at run time), its
implementation (the check, once, then the backend's code) and its typed Python function (which
resolves the backend, checks what needs host values, and calls the op). Importing this module
registers the ops; it must be imported before any graph capture (``import lora_ops`` does it).
Triton kernels are imported lazily, the first time a Triton backend runs.

Conventions shared by every op and every backend:

- Shrink weights ``A (L, n*R, in)``: slice ``i`` of slot ``l`` in rows ``[i*R, i*R + r_l)``.
  Expand weights ``B (L, out, R)``: columns ``[:r_l]``. Embedding weights ``A (L, R, vocab)``.
- ``R`` (max rank) comes from the weight shapes; ``r_l`` (rank per slot, 0 = unused) from
  ``adapter_rank``. Tokens whose ``token_adapter`` is -1 get no LoRA.
- The scaling ``c_l`` is applied in the expand ops, never in shrink.
- Shrink returns ``y`` with zeros beyond each adapter's rank and for tokens without adapter.
- Expand ops add into ``base_output`` in place (``Tensor(a!)``) and return nothing.
- The metadata tensors come from a ``LoRABatch`` (``batch.op_metadata(plan)``); ``backend`` and
  ``kernel`` are a resolved decision (``lora_ops.dispatch.resolve``), never ``auto``.
- No op has a backward yet: called with inputs that require grad (and grad mode on), every op
  raises instead of returning silently wrong (zero) gradients (``checks.check_no_grad``, part of
  each op's check, so eager calls and tracing both refuse).
"""

from __future__ import annotations

import torch

from . import checks, torch_native
from .batch import LoRABatch
from .dispatch import resolve

_METADATA = ("Tensor token_adapter, Tensor token_order, Tensor chunk_adapter, Tensor chunk_start, "
             "Tensor chunk_len, Tensor adapter_rank")

SCHEMAS = {
    "sgmv_shrink": (f"sgmv_shrink(Tensor x, Tensor weights, {_METADATA}, int num_slices, "
                    "int chunk_size, str backend, str kernel) -> Tensor"),
    "sgmv_expand": (f"sgmv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                    "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, str backend, "
                    "str kernel) -> ()"),
    "qkv_expand": (f"qkv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                   "Tensor adapter_scaling, SymInt q_size, SymInt kv_size, int chunk_size, "
                   "str backend, str kernel) -> ()"),
    "gate_up_expand": (f"gate_up_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                       "Tensor adapter_scaling, int chunk_size, str backend, str kernel) -> ()"),
    "embedding_a": ("embedding_a(Tensor token_ids, Tensor weights, Tensor token_adapter, "
                    "Tensor adapter_rank, str backend) -> Tensor"),
}

_lib = torch.library.Library("lora", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))


def _register(name: str, fake, impl) -> None:
    torch.library.register_fake(f"lora::{name}", fake, lib=_lib)
    for device in ("CPU", "CUDA"):
        _lib.impl(name, impl, device)


def _triton_kernels():
    """The Triton kernel modules, imported on first use."""
    import csrc_triton.embedding
    import csrc_triton.expand
    import csrc_triton.shrink

    return csrc_triton


# ---- sgmv_shrink ------------------------------------------------------------------------------


def _shrink_fake(x, weights, *args):
    checks.check_shrink_args("sgmv_shrink", x, weights, *args)
    return x.new_empty(x.shape[0], weights.shape[1])


def _shrink_impl(x, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                 adapter_rank, num_slices, chunk_size, backend, kernel):
    checks.check_shrink_args("sgmv_shrink", x, weights, token_adapter, token_order, chunk_adapter,
                             chunk_start, chunk_len, adapter_rank, num_slices, chunk_size, backend, kernel)
    if backend == "torch_native":
        return torch_native.sgmv_shrink(x, weights, token_adapter, adapter_rank, num_slices)
    shrink = _triton_kernels().shrink
    if kernel == "per_token":
        return shrink.launch_per_token(x, weights, token_adapter, adapter_rank, num_slices)
    return shrink.launch_chunk(x, weights, token_order, chunk_adapter, chunk_start, chunk_len,
                               adapter_rank, num_slices, chunk_size, permuted=backend == "csgmv")


_register("sgmv_shrink", _shrink_fake, _shrink_impl)


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
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_num_slices(op, num_slices, weights)
    checks.check_rank(op, batch, weights.shape[1] // num_slices, "weights.shape[1] // num_slices")
    decision = resolve(op, batch, weights, backend)
    return torch.ops.lora.sgmv_shrink(x, weights, *batch.op_metadata(decision.plan), num_slices,
                                      batch.chunk_size, decision.backend, decision.kernel)


# ---- the expand ops: sgmv_expand, qkv_expand, gate_up_expand ---------------------------------


def _run_expand(op, base_output, y, weights, token_adapter, token_order, chunk_adapter,
                chunk_start, chunk_len, adapter_rank, adapter_scaling, slice_offsets, chunk_size,
                backend, kernel) -> None:
    slice_offsets = [int(offset) for offset in slice_offsets]
    checks.check_expand_args(op, base_output, y, weights, token_adapter, token_order, chunk_adapter,
                             chunk_start, chunk_len, adapter_rank, adapter_scaling, slice_offsets,
                             chunk_size, backend, kernel)
    if backend == "torch_native":
        torch_native.sgmv_expand(base_output, y, weights, token_adapter, adapter_rank,
                                 adapter_scaling, slice_offsets)
        return
    expand = _triton_kernels().expand
    if kernel == "per_token":
        expand.launch_per_token(y, weights, base_output, token_adapter, adapter_rank,
                                adapter_scaling, slice_offsets)
        return
    expand.launch_chunk(y, weights, base_output, token_order, chunk_adapter, chunk_start, chunk_len,
                        adapter_rank, adapter_scaling, slice_offsets, chunk_size,
                        permuted=backend == "csgmv")


# Each expand op's args after (base_output, y, weights): the 6 metadata tensors,
# adapter_scaling, its slice arguments, chunk_size, backend, kernel.
def _expand_fake(base_output, y, weights, *args):
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = args
    checks.check_expand_args("sgmv_expand", base_output, y, weights, *metadata, adapter_scaling,
                             slice_offsets, chunk_size, backend, kernel)


def _expand_impl(base_output, y, weights, *args):
    _run_expand("sgmv_expand", base_output, y, weights, *args)


def _qkv_expand_args(base_output, args):
    *metadata, adapter_scaling, q_size, kv_size, chunk_size, backend, kernel = args
    offsets = checks.qkv_offsets("qkv_expand", base_output, q_size, kv_size)
    return (*metadata, adapter_scaling, offsets, chunk_size, backend, kernel)


def _qkv_expand_fake(base_output, y, weights, *args):
    checks.check_expand_args("qkv_expand", base_output, y, weights, *_qkv_expand_args(base_output, args))


def _qkv_expand_impl(base_output, y, weights, *args):
    _run_expand("qkv_expand", base_output, y, weights, *_qkv_expand_args(base_output, args))


def _gate_up_expand_args(base_output, args):
    *metadata, adapter_scaling, chunk_size, backend, kernel = args
    offsets = checks.gate_up_offsets("gate_up_expand", base_output)
    return (*metadata, adapter_scaling, offsets, chunk_size, backend, kernel)


def _gate_up_expand_fake(base_output, y, weights, *args):
    checks.check_expand_args("gate_up_expand", base_output, y, weights,
                             *_gate_up_expand_args(base_output, args))


def _gate_up_expand_impl(base_output, y, weights, *args):
    _run_expand("gate_up_expand", base_output, y, weights, *_gate_up_expand_args(base_output, args))


_register("sgmv_expand", _expand_fake, _expand_impl)
_register("qkv_expand", _qkv_expand_fake, _qkv_expand_impl)
_register("gate_up_expand", _gate_up_expand_fake, _gate_up_expand_impl)


def _expand(op: str, y, weights, batch: LoRABatch, base_output, backend, slice_args: tuple) -> None:
    """Shared by the expand functions: host checks, the decision, then the op named ``op``."""
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_rank(op, batch, weights.shape[2], "weights.shape[2]")
    decision = resolve(op, batch, weights, backend)
    getattr(torch.ops.lora, op)(base_output, y, weights, *batch.op_metadata(decision.plan),
                                batch.adapter_scaling, *slice_args, batch.chunk_size,
                                decision.backend, decision.kernel)


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
        slice_offsets: ``[0, o_1, ..., out]``, strictly increasing, 1 to 3 slices: slice ``i`` is
            columns ``[o_i, o_{i+1})`` of ``base_output`` and rows of ``weights``.
        backend: as in ``sgmv_shrink``.
    """
    _expand("sgmv_expand", y, weights, batch, base_output, backend, (list(slice_offsets),))


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
    _expand("qkv_expand", y, weights, batch, base_output, backend, (q_size, kv_size))


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
    _expand("gate_up_expand", y, weights, batch, base_output, backend, ())


# ---- embedding_a ------------------------------------------------------------------------------


def _embedding_a_fake(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_embedding_args("embedding_a", token_ids, weights, token_adapter, adapter_rank, backend)
    return weights.new_empty(token_ids.shape[0], weights.shape[1])


def _embedding_a_impl(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_embedding_args("embedding_a", token_ids, weights, token_adapter, adapter_rank, backend)
    if backend == "torch_native":
        return torch_native.embedding_a(token_ids, weights, token_adapter, adapter_rank)
    return _triton_kernels().embedding.launch(token_ids, weights, token_adapter, adapter_rank)


_register("embedding_a", _embedding_a_fake, _embedding_a_impl)


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
    checks.check_tensor(op, "token_ids", token_ids, 1, dtypes=checks.INDEX_DTYPES)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_rank(op, batch, weights.shape[1], "weights.shape[1]")
    checks.check_token_ids_in_range(op, token_ids, weights.shape[2])
    decision = resolve(op, batch, weights, backend)
    return torch.ops.lora.embedding_a(token_ids, weights, batch.token_adapter, batch.adapter_rank,
                                      decision.backend)
