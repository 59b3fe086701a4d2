"""The torch_native backend: DESIGN.md's math in plain PyTorch, one adapter at a time.

The readable reference and the CPU path. It reads ranks and scalings back to the host and
indexes tokens by adapter with data-dependent shapes, so it synchronises and cannot be captured
in a CUDA graph; the Triton backends can.
"""

from __future__ import annotations

import torch


def _tokens_per_adapter(token_adapter: torch.Tensor, adapter_rank: torch.Tensor):
    """Yield (slot, rank, token rows) for every slot with rank > 0 that has tokens."""
    for slot, rank in enumerate(adapter_rank.tolist()):
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
    scalings = adapter_scaling.tolist()
    for slot, rank, rows in _tokens_per_adapter(token_adapter, adapter_rank):
        y_rows = y[rows]
        for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
            delta = y_rows[:, i * max_rank : i * max_rank + rank] @ weights[slot, lo:hi, :rank].T
            base_output[:, lo:hi].index_add_(0, rows, delta, alpha=scalings[slot])


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
