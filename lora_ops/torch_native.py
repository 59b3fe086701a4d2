"""The torch_native backend: the ops' math (see lora_ops/ops.py) in plain PyTorch, one adapter at a time.

The readable reference and the CPU path. It reads ranks and scalings back to the host and
indexes tokens by adapter with data-dependent shapes, so it synchronises and cannot be captured
in a CUDA graph (it refuses, with a clear error); the Triton backends can.
"""

from __future__ import annotations

import torch


def _host_values(tensor: torch.Tensor) -> list:
    """``tensor.tolist()``: the host synchronisation of this backend, refused (with the way
    out) while a CUDA graph is being captured, where it would break the capture."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the torch_native backend reads adapter ranks and scalings back to the host, which a CUDA "
                           "graph cannot capture: use backend 'triton', 'csgmv' or 'auto' under CUDA graphs and "
                           "torch.compile(mode='reduce-overhead')")
    return tensor.tolist()


def _tokens_per_adapter(token_adapter: torch.Tensor, adapter_rank: torch.Tensor):
    """Yield (slot, rank, token rows) for every slot with rank > 0 that has tokens."""
    for slot, rank in enumerate(_host_values(adapter_rank)):
        if rank == 0:
            continue
        rows = torch.nonzero(token_adapter == slot).squeeze(1)
        if rows.numel():
            yield slot, rank, rows


def sgmv_shrink(
    x: torch.Tensor,
    weights: torch.Tensor,
    token_adapter: torch.Tensor,
    adapter_rank: torch.Tensor,
    num_slices: int,
) -> torch.Tensor:
    max_rank = weights.shape[1] // num_slices
    y = x.new_zeros(x.shape[0], weights.shape[1])
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        x_rows = x[rows]
        for i in range(num_slices):
            cols = slice(i * max_rank, i * max_rank + rank)
            y[rows, cols] = x_rows @ weights[slot, cols].T
    return y


def sgmv_expand(
    base_output: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    token_adapter: torch.Tensor,
    adapter_rank: torch.Tensor,
    adapter_scaling: torch.Tensor,
    slice_offsets: list[int],
) -> None:
    max_rank = weights.shape[2]
    scalings = _host_values(adapter_scaling)
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        y_rows = y[rows]
        for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
            delta = y_rows[:, i * max_rank : i * max_rank + rank] @ weights[slot, lo:hi, :rank].T
            # index_put_, not index_add_: on CPU with 2 threads, index_add_ with alpha 1 takes ~60 ms
            base_output[:, lo:hi].index_put_((rows,), scalings[slot] * delta, accumulate=True)


def embedding_a(
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    token_adapter: torch.Tensor,
    adapter_rank: torch.Tensor,
) -> torch.Tensor:
    y = weights.new_zeros(token_ids.shape[0], weights.shape[1])
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        y[rows, :rank] = weights[slot, :rank, token_ids[rows]].T
    return y


# ---- backward (the formulas are stated in ops.py, "training") ----


def sgmv_shrink_grad_x(grad_y, weights, token_adapter, adapter_rank, num_slices: int) -> torch.Tensor:
    max_rank = weights.shape[1] // num_slices
    grad_x = grad_y.new_zeros(grad_y.shape[0], weights.shape[2])
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        for i in range(num_slices):
            cols = slice(i * max_rank, i * max_rank + rank)
            grad_x.index_put_((rows,), grad_y[rows, cols] @ weights[slot, cols], accumulate=True)
    return grad_x


def sgmv_shrink_grad_weights(grad_y, x, token_adapter, adapter_rank, num_slices: int) -> torch.Tensor:
    max_rank = grad_y.shape[1] // num_slices
    grad_w = x.new_zeros(adapter_rank.shape[0], grad_y.shape[1], x.shape[1])
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        for i in range(num_slices):
            cols = slice(i * max_rank, i * max_rank + rank)
            grad_w[slot, cols] = grad_y[rows, cols].T @ x[rows]
    return grad_w


def sgmv_expand_grad_y(grad_out, weights, token_adapter, adapter_rank, adapter_scaling,
                       slice_offsets: list[int]) -> torch.Tensor:
    max_rank = weights.shape[2]
    grad_y = grad_out.new_zeros(grad_out.shape[0], (len(slice_offsets) - 1) * max_rank)
    scalings = adapter_scaling.tolist()
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
            grad_y[rows, i * max_rank : i * max_rank + rank] = (
                scalings[slot] * (grad_out[rows, lo:hi] @ weights[slot, lo:hi, :rank]))
    return grad_y


def sgmv_expand_grad_weights(grad_out, y, token_adapter, adapter_rank, adapter_scaling,
                             slice_offsets: list[int]) -> torch.Tensor:
    max_rank = y.shape[1] // (len(slice_offsets) - 1)
    grad_w = y.new_zeros(adapter_rank.shape[0], grad_out.shape[1], max_rank)
    scalings = adapter_scaling.tolist()
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
            y_rows = y[rows, i * max_rank : i * max_rank + rank]
            grad_w[slot, lo:hi, :rank] = scalings[slot] * (grad_out[rows, lo:hi].T @ y_rows)
    return grad_w


def embedding_a_grad_weights(grad_y, token_ids, token_adapter, adapter_rank, vocab_size: int) -> torch.Tensor:
    grad_w = grad_y.new_zeros(adapter_rank.shape[0], grad_y.shape[1], vocab_size)
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        grad_w[slot, :rank].T.index_put_((token_ids[rows],), grad_y[rows, :rank], accumulate=True)
    return grad_w
