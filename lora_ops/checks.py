"""Argument checks of the public functions: each names the argument and what was expected.

They read shapes, dtypes, devices and strides only (no device data), so they cost no host
synchronisation; values that vary per batch were validated once by ``LoRABatch``.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LoRAArgumentError(ValueError):
    pass


def fail(op: str, message: str):
    raise LoRAArgumentError(f"{op}: {message}")


def check_tensor(op: str, name: str, tensor, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(op, f"{name} must have dtype {expected}, got {tensor.dtype}")
    if tensor.numel() and tensor.stride(-1) != 1:
        fail(op, f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def check_like(op: str, name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        fail(op, f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {tensor.dtype}")
    if tensor.device != ref.device:
        fail(op, f"{name} must be on the device of {ref_name} ({ref.device}), got {tensor.device}")


def check_dim(op: str, what: str, actual, expected) -> None:
    if actual != expected:
        fail(op, f"{what}: expected {expected}, got {actual}")


def check_batch_device(op: str, batch, name: str, tensor: torch.Tensor) -> None:
    if batch.device != tensor.device:
        fail(op, f"batch metadata is on {batch.device} but {name} is on {tensor.device}")


def _check_index_tensors(op: str, name: str, tensor: torch.Tensor, named_metadata) -> None:
    """Each (name, metadata tensor) is 1-D int32 on ``tensor``'s device."""
    for meta_name, meta in named_metadata:
        check_tensor(op, meta_name, meta, 1, dtypes=(torch.int32,))
        if meta.device != tensor.device:
            fail(op, f"batch metadata is on {meta.device} but {name} is on {tensor.device}")


_METADATA = ("token_adapter", "token_order", "chunk_adapter", "chunk_start", "chunk_len", "adapter_rank")


def check_metadata(op: str, name: str, tensor: torch.Tensor, weights: torch.Tensor, metadata) -> None:
    """The batch metadata tensors (``LoRABatch`` order) fit ``tensor``'s tokens and device and
    ``weights``' adapter slots. Their values were validated when the batch was built."""
    _check_index_tensors(op, name, tensor, zip(_METADATA, metadata))
    token_adapter, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank = metadata
    check_dim(op, f"{name}.shape[0] (tokens) must match the batch's token count", tensor.shape[0], token_adapter.shape[0])
    check_dim(op, "token_order.shape[0] must match the batch's token count", token_order.shape[0], token_adapter.shape[0])
    check_dim(op, "chunk_start.shape[0] must match chunk_adapter.shape[0]", chunk_start.shape[0], chunk_adapter.shape[0])
    check_dim(op, "chunk_len.shape[0] must match chunk_adapter.shape[0]", chunk_len.shape[0], chunk_adapter.shape[0])
    check_dim(op, "weights.shape[0] (adapter slots) must match the batch's slots", weights.shape[0], adapter_rank.shape[0])


def check_scaling(op: str, adapter_scaling, adapter_rank: torch.Tensor) -> None:
    check_tensor(op, "adapter_scaling", adapter_scaling, 1, dtypes=(torch.float32,))
    if adapter_scaling.device != adapter_rank.device:
        fail(op, f"adapter_scaling must be on {adapter_rank.device}, got {adapter_scaling.device}")
    check_dim(op, "adapter_scaling.shape[0] must match the batch's slots", adapter_scaling.shape[0], adapter_rank.shape[0])


def check_shrink(op: str, x, weights, metadata, num_slices) -> None:
    check_tensor(op, "x", x, 2)
    check_tensor(op, "weights", weights, 3)
    check_like(op, "weights", weights, "x", x)
    check_metadata(op, "x", x, weights, metadata)
    check_dim(op, "weights.shape[2] (in features) must match x.shape[1]", weights.shape[2], x.shape[1])
    if not isinstance(num_slices, int) or num_slices < 1 or weights.shape[1] % num_slices:
        fail(op, f"num_slices must be a positive int dividing weights.shape[1] = {weights.shape[1]}, got {num_slices}")


def check_expand(op: str, base_output, y, weights, metadata, adapter_scaling, slice_offsets) -> None:
    check_tensor(op, "base_output", base_output, 2)
    check_slice_offsets(op, slice_offsets, base_output.shape[1])
    check_tensor(op, "y", y, 2)
    check_tensor(op, "weights", weights, 3)
    check_like(op, "y", y, "base_output", base_output)
    check_like(op, "weights", weights, "base_output", base_output)
    check_metadata(op, "base_output", base_output, weights, metadata)
    check_scaling(op, adapter_scaling, metadata[-1])
    num_slices = len(slice_offsets) - 1
    check_dim(op, "y.shape[0] (tokens) must match base_output.shape[0]", y.shape[0], base_output.shape[0])
    check_dim(op, "weights.shape[1] (out features) must match base_output.shape[1]", weights.shape[1], base_output.shape[1])
    check_dim(op, f"y.shape[1] must be {num_slices} slices x weights.shape[2] (R)", y.shape[1], num_slices * weights.shape[2])


def check_embedding(op: str, token_ids, weights, token_adapter, adapter_rank) -> None:
    check_tensor(op, "token_ids", token_ids, 1, dtypes=(torch.int32, torch.int64))
    check_tensor(op, "weights", weights, 3)
    if weights.device != token_ids.device:
        fail(op, f"weights must be on the device of token_ids ({token_ids.device}), got {weights.device}")
    _check_index_tensors(op, "token_ids", token_ids,
                         (("token_adapter", token_adapter), ("adapter_rank", adapter_rank)))
    check_dim(op, "token_ids.shape[0] (tokens) must match the batch's token count", token_ids.shape[0], token_adapter.shape[0])
    check_dim(op, "weights.shape[0] (adapter slots) must match the batch's slots", weights.shape[0], adapter_rank.shape[0])


def check_rank(op: str, batch, max_rank: int, where: str) -> None:
    if batch.max_rank > max_rank:
        fail(op, f"adapter rank {batch.max_rank} exceeds the weights' max rank R={max_rank} ({where})")


def check_slice_offsets(op: str, slice_offsets, out_features: int) -> None:
    offsets = list(slice_offsets)
    if len(offsets) < 2 or offsets[0] != 0:
        fail(op, f"slice_offsets must start at 0 and have at least 2 entries, got {offsets}")
    if len(offsets) > 4:
        fail(op, f"slice_offsets may describe at most 3 slices (q/k/v), got {len(offsets) - 1}")
    if any(hi <= lo for lo, hi in zip(offsets[:-1], offsets[1:])):
        fail(op, f"slice_offsets must be strictly increasing, got {offsets}")
    if offsets[-1] != out_features:
        fail(op, f"slice_offsets must end at base_output.shape[1] = {out_features}, got {offsets}")


def check_qkv_sizes(op: str, base_output, q_size, kv_size) -> None:
    if q_size <= 0 or kv_size <= 0 or q_size + 2 * kv_size != base_output.shape[1]:
        fail(op, f"q_size + 2*kv_size must equal base_output.shape[1] = {base_output.shape[1]} "
                 f"with both positive, got q_size={q_size}, kv_size={kv_size}")


def check_gate_up_width(op: str, base_output) -> None:
    if base_output.shape[1] % 2:
        fail(op, f"base_output.shape[1] must be even (gate and up halves), got {base_output.shape[1]}")


def check_token_ids_in_range(op: str, token_ids: torch.Tensor, vocab_size: int) -> None:
    """Eager-only check of the ids' values (one host sync); skipped while compiling or capturing."""
    if torch.compiler.is_compiling() or token_ids.numel() == 0:
        return
    if token_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)]
        fail(op, f"token_ids must lie in [0, {vocab_size}) (weights.shape[2]), got {bad.unique()[:8].tolist()}")
