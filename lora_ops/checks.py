"""Argument checks: each failure names the op, the argument and what was expected.

The ``check_*_args`` functions are each op's contract check, called by both its fake (while
tracing, where sizes may be symbolic: size equalities go through ``torch._check_with``) and its
real implementation (once per call). They read shapes, dtypes, devices and strides only, never
device data, so they cost no host synchronisation; values that vary per batch (adapter ids,
ranks, scalings) were validated once, when the ``LoRABatch`` was built.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# The differentiable twins on torch_native also take float64: torch.autograd.gradcheck's dtype.
GRADCHECK_DTYPES = (*FLOAT_DTYPES, torch.float64)
BACKEND_KERNELS = {"torch_native": ("torch",), "triton": ("chunk", "per_token"),
                   "csgmv": ("chunk", "per_token")}
MAX_SLICES = 3


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
    if tensor.stride(-1) != 1 and tensor.numel() > 0:
        fail(op, f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def check_like(op: str, name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        fail(op, f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {tensor.dtype}")
    if tensor.device != ref.device:
        fail(op, f"{name} must be on the device of {ref_name} ({ref.device}), got {tensor.device}")


def check_size(op: str, what: str, actual, expected) -> None:
    """``actual == expected`` for ints, or SymInts while tracing (a runtime assert there)."""
    if type(actual) is int and type(expected) is int:  # the eager hot path: skip torch._check
        if actual != expected:
            fail(op, f"{what}: expected {expected}, got {actual}")
        return
    torch._check_with(LoRAArgumentError, actual == expected,
                      lambda: f"{op}: {what}: expected {expected}, got {actual}")


def check_no_grad(op: str, *tensors) -> None:
    """The inference ops have no autograd kernel (one in Python costs every call ~5 us of host
    time): refuse inputs that require grad rather than return silently wrong (zero) gradients."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        fail(op, f"an input requires grad, but lora::{op} has no backward; call lora_ops.{op}, which "
                 "then runs the op's differentiable twin (lora::*_autograd), or call it under torch.no_grad()")


def check_backend(op: str, backend: str, kernel: str) -> None:
    if kernel not in BACKEND_KERNELS.get(backend, ()):
        choices = "; ".join(f"{b} with kernel {' or '.join(k)}" for b, k in BACKEND_KERNELS.items())
        fail(op, f"backend {backend!r} with kernel {kernel!r} is not a resolved choice ({choices}); "
                 "lora_ops.dispatch.resolve gives one")


def check_metadata(op: str, name: str, tensor, token_adapter, token_order, chunk_adapter,
                   chunk_start, chunk_len, adapter_rank) -> None:
    """The batch metadata (int32, 1-D, on ``tensor``'s device) fits ``tensor``'s tokens."""
    _check_index_tensors(op, name, tensor, (("token_adapter", token_adapter), ("token_order", token_order),
                                            ("chunk_adapter", chunk_adapter), ("chunk_start", chunk_start),
                                            ("chunk_len", chunk_len), ("adapter_rank", adapter_rank)))
    num_tokens = token_adapter.shape[0]
    check_size(op, f"{name}.shape[0] (tokens) must match the batch's token count", tensor.shape[0], num_tokens)
    check_size(op, "token_order.shape[0] must match the batch's token count", token_order.shape[0], num_tokens)
    check_size(op, "chunk_start.shape[0] must match chunk_adapter.shape[0]", chunk_start.shape[0], chunk_adapter.shape[0])
    check_size(op, "chunk_len.shape[0] must match chunk_adapter.shape[0]", chunk_len.shape[0], chunk_adapter.shape[0])


def _check_index_tensors(op: str, name: str, tensor, named_metadata) -> None:
    device = tensor.device
    for meta_name, meta in named_metadata:
        if meta.dtype != torch.int32 or meta.dim() != 1 or meta.device != device:  # one test, then why
            check_tensor(op, meta_name, meta, 1, dtypes=(torch.int32,))
            fail(op, f"batch metadata ({meta_name}) is on {meta.device} but {name} is on {device}")


def check_slots(op: str, weights, adapter_rank) -> None:
    check_size(op, "weights.shape[0] (adapter slots) must match the batch's slots", weights.shape[0], adapter_rank.shape[0])


def check_num_slices(op: str, num_slices, weights) -> None:
    """A host value: the Python function checks it before reading ``weights.shape[1] // num_slices``."""
    if not isinstance(num_slices, int) or not 1 <= num_slices <= MAX_SLICES or weights.shape[1] % num_slices:
        fail(op, f"num_slices must be an int in [1, {MAX_SLICES}] dividing weights.shape[1] = "
                 f"{weights.shape[1]}, got {num_slices}")


def twin_dtypes(backend: str) -> tuple:
    """The float dtypes a differentiable twin (``lora::*_autograd``) takes on ``backend``."""
    return GRADCHECK_DTYPES if backend == "torch_native" else FLOAT_DTYPES


def check_shrink_args(op, x, weights, token_adapter, token_order, chunk_adapter, chunk_start,
                      chunk_len, adapter_rank, num_slices, chunk_size, backend, kernel,
                      float_dtypes=FLOAT_DTYPES) -> None:
    check_tensor(op, "x", x, 2, float_dtypes)
    check_tensor(op, "weights", weights, 3, float_dtypes)
    check_like(op, "weights", weights, "x", x)
    check_num_slices(op, num_slices, weights)
    check_metadata(op, "x", x, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank)
    check_slots(op, weights, adapter_rank)
    check_size(op, "weights.shape[2] (in features) must match x.shape[1]", weights.shape[2], x.shape[1])
    check_backend(op, backend, kernel)


def check_slice_offsets(op: str, slice_offsets, out_features) -> list:
    """The offsets as a list, if they are valid."""
    offsets = list(slice_offsets)
    if len(offsets) < 2 or offsets[0] != 0:
        fail(op, f"slice_offsets must start at 0 and have at least 2 entries, got {offsets}")
    if len(offsets) > MAX_SLICES + 1:
        fail(op, f"slice_offsets may describe at most {MAX_SLICES} slices (q/k/v), got {len(offsets) - 1}")
    if any(hi <= lo for lo, hi in zip(offsets[:-1], offsets[1:])):
        fail(op, f"slice_offsets must be strictly increasing, got {offsets}")
    if offsets[-1] != out_features:
        fail(op, f"slice_offsets must end at base_output.shape[1] = {out_features}, got {offsets}")
    return offsets


def check_expand_args(op, base_output, y, weights, token_adapter, token_order, chunk_adapter,
                      chunk_start, chunk_len, adapter_rank, adapter_scaling, slice_offsets,
                      chunk_size, backend, kernel, float_dtypes=FLOAT_DTYPES) -> None:
    check_tensor(op, "base_output", base_output, 2, float_dtypes)
    check_slice_offsets(op, slice_offsets, base_output.shape[1])
    check_tensor(op, "y", y, 2, float_dtypes)
    check_tensor(op, "weights", weights, 3, float_dtypes)
    check_like(op, "y", y, "base_output", base_output)
    check_like(op, "weights", weights, "base_output", base_output)
    check_metadata(op, "base_output", base_output, token_adapter, token_order, chunk_adapter,
                   chunk_start, chunk_len, adapter_rank)
    check_slots(op, weights, adapter_rank)
    check_tensor(op, "adapter_scaling", adapter_scaling, 1, dtypes=(torch.float32,))
    if adapter_scaling.device != adapter_rank.device:
        fail(op, f"adapter_scaling must be on {adapter_rank.device}, got {adapter_scaling.device}")
    check_size(op, "adapter_scaling.shape[0] must match the batch's slots", adapter_scaling.shape[0], adapter_rank.shape[0])
    num_slices = len(slice_offsets) - 1
    check_size(op, "y.shape[0] (tokens) must match base_output.shape[0]", y.shape[0], base_output.shape[0])
    check_size(op, "weights.shape[1] (out features) must match base_output.shape[1]", weights.shape[1], base_output.shape[1])
    check_size(op, f"y.shape[1] must be {num_slices} slices x weights.shape[2] (R)", y.shape[1], num_slices * weights.shape[2])
    check_backend(op, backend, kernel)


# The eager hot path (lora_ops.ops, direct calls): everything the Python function and the op
# would check, as one test without messages. False sends the call through the checks, which
# name what is wrong (or, where a test here is stricter, through the op). Each must be false
# wherever a check fails; the metadata tensors need none, the LoRABatch checked them when built.
# (stride()[i], not stride(i): the tuple costs about half as much host time.)


def shrink_call_ok(x, weights, batch, num_slices) -> bool:
    """For plain tensors ``x`` and ``weights``."""
    xs, ws, device = x.shape, weights.shape, x.device
    return (len(xs) == 2 and len(ws) == 3 and x.dtype in FLOAT_DTYPES and weights.dtype == x.dtype
            and weights.device == device and x.stride()[1] == 1 and weights.stride()[2] == 1 and ws[2] == xs[1]
            and type(num_slices) is int and 1 <= num_slices <= MAX_SLICES and ws[1] % num_slices == 0
            and _fits_batch(batch, device, xs[0], ws[0], ws[1] // num_slices))


def expand_call_ok(base_output, y, weights, batch, num_slices: int) -> bool:
    """For plain tensors and slice offsets already checked (``num_slices`` of them)."""
    bs, ys, ws, device = base_output.shape, y.shape, weights.shape, base_output.device
    return (len(bs) == 2 and len(ys) == 2 and len(ws) == 3 and base_output.dtype in FLOAT_DTYPES
            and y.dtype == base_output.dtype and weights.dtype == base_output.dtype
            and y.device == device and weights.device == device
            and base_output.stride()[1] == 1 and y.stride()[1] == 1 and weights.stride()[2] == 1
            and ys[0] == bs[0] and ws[1] == bs[1] and ys[1] == num_slices * ws[2]
            and _fits_batch(batch, device, bs[0], ws[0], ws[2]))


def embedding_call_ok(token_ids, weights, batch) -> bool:
    """For plain tensors; the ids' values are checked apart (check_token_ids_in_range)."""
    ts, ws, device = token_ids.shape, weights.shape, token_ids.device
    return (len(ts) == 1 and len(ws) == 3 and token_ids.dtype in INDEX_DTYPES and weights.dtype in FLOAT_DTYPES
            and weights.device == device and token_ids.stride()[0] == 1 and weights.stride()[2] == 1
            and _fits_batch(batch, device, ts[0], ws[0], ws[1]))


def _fits_batch(batch, device, num_tokens: int, num_slots: int, max_rank: int) -> bool:
    """A direct call's device, token count, weight slots and max rank R against ``batch``."""
    token_adapter = batch.token_adapter
    return (token_adapter.device == device and token_adapter.shape[0] == num_tokens
            and batch.adapter_rank.shape[0] == num_slots and batch.max_rank <= max_rank)


def qkv_offsets(op: str, base_output, q_size, kv_size) -> list:
    if q_size <= 0 or kv_size <= 0 or q_size + 2 * kv_size != base_output.shape[1]:
        fail(op, f"q_size + 2*kv_size must equal base_output.shape[1] = {base_output.shape[1]} "
                 f"with both positive, got q_size={q_size}, kv_size={kv_size}")
    return [0, q_size, q_size + kv_size, q_size + 2 * kv_size]


def gate_up_offsets(op: str, base_output) -> list:
    width = base_output.shape[1]
    if width % 2:
        fail(op, f"base_output.shape[1] must be even (gate and up halves), got {width}")
    return [0, width // 2, width]


def check_embedding_args(op, token_ids, weights, token_adapter, adapter_rank, backend,
                         float_dtypes=FLOAT_DTYPES) -> None:
    check_tensor(op, "token_ids", token_ids, 1, dtypes=INDEX_DTYPES)
    check_tensor(op, "weights", weights, 3, float_dtypes)
    if weights.device != token_ids.device:
        fail(op, f"weights must be on the device of token_ids ({token_ids.device}), got {weights.device}")
    _check_index_tensors(op, "token_ids", token_ids, (("token_adapter", token_adapter), ("adapter_rank", adapter_rank)))
    check_size(op, "token_ids.shape[0] (tokens) must match the batch's token count", token_ids.shape[0], token_adapter.shape[0])
    check_slots(op, weights, adapter_rank)
    if backend not in BACKEND_KERNELS:
        fail(op, f"backend must be one of {', '.join(BACKEND_KERNELS)}, got {backend!r}")


def check_rank(op: str, batch, max_rank: int, where: str) -> None:
    if batch.max_rank > max_rank:
        fail(op, f"adapter rank {batch.max_rank} exceeds the weights' max rank R={max_rank} ({where})")


def check_token_ids_in_range(op: str, token_ids: torch.Tensor, vocab_size: int) -> None:
    """Eager-only check of the ids' values (one host sync); skipped while compiling, capturing or
    under a dispatch mode (make_fx, FakeTensor: values cannot be read there)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or token_ids.numel() == 0:
        return
    if token_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    out_of_range = (token_ids < 0) | (token_ids >= vocab_size)
    if bool(out_of_range.any()):
        fail(op, f"token_ids must lie in [0, {vocab_size}) (weights.shape[2]), "
                 f"got {token_ids[out_of_range].unique()[:8].tolist()}")
