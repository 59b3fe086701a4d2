"""LoRA expand (B matmul) over a chunk plan, accumulated in place into the base output.

``base_output[t, o_i:o_{i+1}] += c_a * y[t, i*R : i*R + r_a] @ B[a, o_i:o_{i+1}, :r_a].T`` for
each slice ``i``. The chunk plan is described in ``csrc_triton/__init__.py``.
"""

import torch
import triton
import triton.language as tl

MAX_SLICES = 3


@triton.jit
def _rank_step(y_ptrs, w_ptrs, k, rank, offs_k, row_mask, col_mask, IEEE_DOT: tl.constexpr):
    """y @ B.T over rank columns [k, k + BLOCK_K); columns at or beyond `rank` are not loaded."""
    k_mask = offs_k < rank - k
    y_tile = tl.load(y_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    if IEEE_DOT:
        partial = tl.dot(y_tile, w_tile, input_precision="ieee")
    else:
        partial = tl.dot(y_tile, w_tile)
    return partial


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, weights_ptr, base_ptr, token_order_ptr,
    chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr, adapter_rank_ptr, adapter_scaling_ptr,
    y_stride_row, y_stride_col,
    w_stride_adapter, w_stride_out, w_stride_rank,
    base_stride_row,
    slice1_first_tile, slice2_first_tile,
    slice1_offset, slice2_offset, slice3_offset,
    MAX_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERMUTED: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    if (adapter < 0) | (length == 0):
        return
    rank = tl.load(adapter_rank_ptr + adapter)
    if rank == 0:
        return
    scaling = tl.load(adapter_scaling_ptr + adapter)

    # Tiles never straddle slices: find this tile's slice and its column range.
    in_slice2 = tile >= slice1_first_tile
    in_slice3 = tile >= slice2_first_tile
    slice_idx = in_slice2.to(tl.int32) + in_slice3.to(tl.int32)
    first_tile = tl.where(in_slice3, slice2_first_tile, tl.where(in_slice2, slice1_first_tile, 0))
    slice_start = tl.where(in_slice3, slice2_offset, tl.where(in_slice2, slice1_offset, 0))
    slice_end = tl.where(in_slice3, slice3_offset, tl.where(in_slice2, slice2_offset, slice1_offset))
    cols = slice_start + (tile - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < slice_end

    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    positions = tl.load(chunk_start_ptr + chunk) + offs_m
    if PERMUTED:
        rows = tl.load(token_order_ptr + positions, mask=row_mask, other=0)
    else:
        rows = positions
    rows = rows.to(tl.int64)

    # Issue the base-output read first so its latency overlaps the matmul.
    base_ptrs = base_ptr + rows[:, None] * base_stride_row + cols[None, :]
    tile_mask = row_mask[:, None] & col_mask[None, :]
    base_tile = tl.load(base_ptrs, mask=tile_mask, other=0.0)

    offs_k = tl.arange(0, BLOCK_K)
    y_ptrs = (y_ptr + rows[:, None] * y_stride_row
              + (slice_idx * MAX_RANK + offs_k)[None, :] * y_stride_col)
    w_ptrs = (weights_ptr + adapter.to(tl.int64) * w_stride_adapter
              + cols[None, :].to(tl.int64) * w_stride_out + offs_k[:, None] * w_stride_rank)
    acc = _rank_step(y_ptrs, w_ptrs, 0, rank, offs_k, row_mask, col_mask, IEEE_DOT)
    # Steps beyond the first run only up to this adapter's rank. Unrolled with a guard: a loop
    # with a run-time trip count halved the base-output streaming rate on an H200.
    for k in tl.static_range(BLOCK_K, MAX_RANK, BLOCK_K):
        if k < rank:
            acc += _rank_step(y_ptrs + k * y_stride_col, w_ptrs + k * w_stride_rank, k, rank,
                              offs_k, row_mask, col_mask, IEEE_DOT)

    result = acc * scaling + base_tile.to(tl.float32)
    tl.store(base_ptrs, result.to(base_ptr.dtype.element_ty), mask=tile_mask)


def _expand_config(chunk_size: int, n_total: int, max_rank: int, dtype: torch.dtype):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a plan's chunk size and the weight shape.

    Tuned on an H200 in bf16 (Llama-3-8B qkv and gate-up, ranks 16 and 64): the kernel streams
    the base output, and 128-wide N tiles with 4 warps ran fastest from decode to prefill.
    """
    block_n = 128
    if chunk_size <= 16 and n_total <= 8192:
        block_n = 64  # small decode batches: more programs in flight over a narrow output
    if dtype == torch.float32 and chunk_size >= 64:
        block_n = 64  # fp32 base tile and accumulator both live in registers
    # One K step covers ranks up to 64: further (guarded) steps cost more than the padded MMA.
    block_k = max(16, min(64, triton.next_power_of_2(max_rank)))
    # No K loop to software-pipeline: a single stage.
    return block_n, block_k, 4, 1


def sgmv_expand(y, weights, base_output, token_order, chunk_adapter, chunk_start, chunk_len,
                adapter_rank, adapter_scaling, slice_offsets: list[int], chunk_size: int,
                permuted: bool) -> None:
    """base_output[t, o_i:o_{i+1}] += c_a * y[t, i*R : i*R+r_a] @ B[a, o_i:o_{i+1}, :r_a].T, in place."""
    num_slices = len(slice_offsets) - 1
    if not 1 <= num_slices <= MAX_SLICES:
        raise ValueError(f"sgmv_expand supports 1 to {MAX_SLICES} slices, got {num_slices}")
    if base_output.stride(1) != 1:
        raise ValueError("base_output must be contiguous along its last dimension")
    num_tokens, n_total = base_output.shape
    max_rank = weights.shape[2]
    if num_tokens == 0:
        return
    block_n, block_k, num_warps, num_stages = _expand_config(
        chunk_size, n_total, max_rank, base_output.dtype)

    # Static tile numbering: slice i owns tiles [first_tile[i], first_tile[i + 1]).
    ends = list(slice_offsets[1:]) + [n_total] * (MAX_SLICES - num_slices)
    first_tile = [0]
    for start, end in zip([0] + ends[:-1], ends):
        first_tile.append(first_tile[-1] + triton.cdiv(end - start, block_n))

    # grid: (N tiles of all slices, chunks) -- tiles of one chunk run side by side and share y in L2
    grid = (first_tile[num_slices], chunk_adapter.shape[0])
    _sgmv_expand_kernel[grid](
        y, weights, base_output, token_order,
        chunk_adapter, chunk_start, chunk_len, adapter_rank, adapter_scaling,
        y.stride(0), y.stride(1),
        weights.stride(0), weights.stride(1), weights.stride(2),
        base_output.stride(0),
        first_tile[1], first_tile[2],
        ends[0], ends[1], ends[2],
        MAX_RANK=max_rank,
        BLOCK_M=chunk_size, BLOCK_N=block_n, BLOCK_K=block_k,
        PERMUTED=permuted, IEEE_DOT=base_output.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
