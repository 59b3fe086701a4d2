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


def check_batch(op: str, batch, name: str, tensor: torch.Tensor, weights: torch.Tensor) -> None:
    """The batch matches the token count and device of ``tensor`` and the slots of ``weights``."""
    if batch.device != tensor.device:
        fail(op, f"batch metadata is on {batch.device} but {name} is on {tensor.device}")
    check_dim(op, f"{name}.shape[0] (tokens) must match the batch's token count", tensor.shape[0], batch.num_tokens)
    check_dim(op, "weights.shape[0] (adapter slots) must match the batch's slots", weights.shape[0], batch.num_slots)


def check_rank(op: str, batch, max_rank: int, where: str) -> None:
    if batch.max_rank > max_rank:
        fail(op, f"adapter rank {batch.max_rank} exceeds the weights' max rank R={max_rank} ({where})")


def check_slice_offsets(op: str, slice_offsets, out_features: int) -> None:
    offsets = list(slice_offsets)
    if len(offsets) < 2 or offsets[0] != 0:
        fail(op, f"slice_offsets must start at 0 and have at least 2 entries, got {offsets}")
    if any(hi <= lo for lo, hi in zip(offsets[:-1], offsets[1:])):
        fail(op, f"slice_offsets must be strictly increasing, got {offsets}")
    if offsets[-1] != out_features:
        fail(op, f"slice_offsets must end at base_output.shape[1] = {out_features}, got {offsets}")


def check_token_ids_in_range(op: str, token_ids: torch.Tensor, vocab_size: int) -> None:
    """Eager-only check of the ids' values (one host sync); skipped while compiling or capturing."""
    if torch.compiler.is_compiling() or token_ids.numel() == 0:
        return
    if token_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)]
        fail(op, f"token_ids must lie in [0, {vocab_size}) (weights.shape[2]), got {bad.unique()[:8].tolist()}")
