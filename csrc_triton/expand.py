"""LoRA expand (B matmul) over a chunk plan, accumulated in place into the base output.

``base_output[t, o_i:o_{i+1}] += c_a * y[t, i*R : i*R + r_a] @ B[a, o_i:o_{i+1}, :r_a].T`` for
each slice ``i``. The chunk plan is described in ``csrc_triton/__init__.py``.

Two kernels: ``launch_chunk`` runs one program per (N tile, chunk) over the plan,
``launch_per_token`` one per (N tile, token); the caller picks (lora_ops.dispatch). N tiles
never straddle slices. Tile choices and what was measured for them: bench_results/NOTES.md.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import (CachedLaunch, cdiv, chunk_rows, dependent_launch, dot, grid_1d, ieee_dot, next_power_of_2,
                     slot_rank, tile_and_row_block, wait_for_previous_kernel)

MAX_SLICES = 3


@triton.jit
def _slice_columns(tile, slice1_first_tile, slice2_first_tile, slice1_offset, slice2_offset,
                   slice3_offset, BLOCK_N: tl.constexpr):
    """Slice index, output columns and their mask of an N tile; tiles never straddle slices."""
    in_slice2 = tile >= slice1_first_tile
    in_slice3 = tile >= slice2_first_tile
    slice_idx = in_slice2.to(tl.int32) + in_slice3.to(tl.int32)
    first_tile = tl.where(in_slice3, slice2_first_tile, tl.where(in_slice2, slice1_first_tile, 0))
    slice_start = tl.where(in_slice3, slice2_offset, tl.where(in_slice2, slice1_offset, 0))
    slice_end = tl.where(in_slice3, slice3_offset, tl.where(in_slice2, slice2_offset, slice1_offset))
    cols = slice_start + (tile - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slice_idx, cols, cols < slice_end


@CachedLaunch
@triton.jit
def _expand_chunk_kernel(
    y_ptr, weights_ptr, base_ptr, out_ptr, token_order_ptr,
    chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr, adapter_rank_ptr, adapter_scaling_ptr,
    y_stride_row, y_stride_col,
    w_stride_adapter, w_stride_out, w_stride_rank,
    base_stride_row, out_stride_row,
    slice1_first_tile, slice2_first_tile,
    slice1_offset, slice2_offset, slice3_offset,
    MAX_RANK: tl.constexpr, NUM_N_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TWO_STEPS: tl.constexpr,
    K_SLICES: tl.constexpr, OUT_OF_PLACE: tl.constexpr, HAS_BASE: tl.constexpr, PERMUTED: tl.constexpr,
    IEEE_DOT: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    wait_for_previous_kernel(DEPENDENT_LAUNCH)
    tile, chunk = tile_and_row_block(NUM_N_TILES)

    slice_idx, cols, col_mask = _slice_columns(tile, slice1_first_tile, slice2_first_tile,
                                               slice1_offset, slice2_offset, slice3_offset, BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rank columns [0, BLOCK_K) are step 0; with TWO_STEPS, [BLOCK_K, 2 * BLOCK_K) are step 1,
    # taken only by adapters of rank > BLOCK_K (MAX_RANK <= 2 * BLOCK_K).
    w_offsets = cols[None, :].to(tl.int64) * w_stride_out + offs_k[:, None] * w_stride_rank
    y_cols = (slice_idx * MAX_RANK + offs_k) * y_stride_col
    w0 = tl.zeros((BLOCK_K, BLOCK_N), dtype=weights_ptr.dtype.element_ty)
    w1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=weights_ptr.dtype.element_ty)

    # Chunk metadata by independent loads and no early return: a chunk with nothing to do
    # (length 0, adapter -1 or rank 0) gets an empty row mask. Measured on an H200, this
    # program shape streams the base output 10% faster at rank 16 than exiting early.
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    start = tl.load(chunk_start_ptr + chunk)
    rank = slot_rank(adapter_rank_ptr, adapter, MAX_RANK)
    if OUT_OF_PLACE:  # out gets every row: the chunk's whole length is read, with or without delta
        row_mask = offs_m < length
    length = tl.where(rank > 0, length, 0)
    if not OUT_OF_PLACE:  # in place, rows without delta are neither read nor written
        row_mask = offs_m < length
    rows = chunk_rows(token_order_ptr, start, offs_m, row_mask, PERMUTED)

    # The base-output read is issued first so its latency overlaps the matmul.
    base_ptrs = base_ptr + rows[:, None] * base_stride_row + cols[None, :]
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BASE:
        base_tile = tl.load(base_ptrs, mask=tile_mask, other=0.0)
    else:  # out = the delta alone (no base output to read)
        base_tile = tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty)
    if OUT_OF_PLACE:
        out_ptrs = out_ptr + rows[:, None] * out_stride_row + cols[None, :]
    else:
        out_ptrs = base_ptrs

    if length > 0:
        # Always true here (length > 0 implies an adapter), but the weight loads in a branch of
        # their own stream the base output 10% faster at rank 16 on an H200 (codegen, measured).
        if adapter >= 0:
            w_ptrs = weights_ptr + adapter.to(tl.int64) * w_stride_adapter + w_offsets
            w0 = tl.load(w_ptrs, mask=(offs_k < rank)[:, None] & col_mask[None, :], other=0.0)
            if TWO_STEPS:
                w1 = tl.load(w_ptrs + BLOCK_K * w_stride_rank,
                             mask=(offs_k < rank - BLOCK_K)[:, None] & col_mask[None, :],
                             other=0.0)
        y_ptrs = y_ptr + rows[:, None] * y_stride_row + y_cols[None, :]
        y0 = tl.load(y_ptrs, mask=row_mask[:, None] & (offs_k < rank)[None, :], other=0.0)
        acc = dot(y0, w0, IEEE_DOT)
        if TWO_STEPS:
            if rank > BLOCK_K:  # a low-rank adapter beside a high-rank one skips this step
                y1 = tl.load(y_ptrs + BLOCK_K * y_stride_col,
                             mask=row_mask[:, None] & (offs_k < rank - BLOCK_K)[None, :], other=0.0)
                acc += dot(y1, w1, IEEE_DOT)
        # K_SLICES > 1 (the shrink's input gradient): y's slices s > 0 and the weights' rank
        # blocks s > 0 extend the sum, each within the rank like slice 0.
        for s in tl.static_range(1, K_SLICES):
            for step in tl.static_range(2 if TWO_STEPS else 1):
                k_mask = offs_k < rank - step * BLOCK_K
                k_offset = s * MAX_RANK + step * BLOCK_K
                w_s = tl.load(weights_ptr + adapter.to(tl.int64) * w_stride_adapter + w_offsets
                              + k_offset * w_stride_rank, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                y_s = tl.load(y_ptrs + k_offset * y_stride_col, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                acc += dot(y_s, w_s, IEEE_DOT)
        scaling = tl.load(adapter_scaling_ptr + adapter)
        result = acc * scaling + base_tile.to(tl.float32)
        tl.store(out_ptrs, result.to(base_ptr.dtype.element_ty), mask=tile_mask)
    elif OUT_OF_PLACE:  # tokens without adapter: the base output as it is
        tl.store(out_ptrs, base_tile, mask=tile_mask)


@CachedLaunch
@triton.jit
def _expand_per_token_kernel(
    y_ptr, weights_ptr, base_ptr, token_adapter_ptr, adapter_rank_ptr, adapter_scaling_ptr,
    # strides and slice bounds are fixed per model: as constexprs they leave the launch key only
    # tensors (host time)
    Y_STRIDE_ROW: tl.constexpr, Y_STRIDE_COL: tl.constexpr,
    W_STRIDE_ADAPTER: tl.constexpr, W_STRIDE_OUT: tl.constexpr, W_STRIDE_RANK: tl.constexpr,
    BASE_STRIDE_ROW: tl.constexpr,
    SLICE1_FIRST_TILE: tl.constexpr, SLICE2_FIRST_TILE: tl.constexpr,
    SLICE1_OFFSET: tl.constexpr, SLICE2_OFFSET: tl.constexpr, SLICE3_OFFSET: tl.constexpr,
    MAX_RANK: tl.constexpr, NUM_N_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    wait_for_previous_kernel(DEPENDENT_LAUNCH)
    # One program per (N tile, token), a GEMV without the chunk plan (see csrc_triton/shrink.py's
    # per-token kernel): the weight and base loads depend only on the token's adapter.
    tile, token = tile_and_row_block(NUM_N_TILES)
    token = token.to(tl.int64)
    slice_idx, cols, col_mask = _slice_columns(tile, SLICE1_FIRST_TILE, SLICE2_FIRST_TILE,
                                               SLICE1_OFFSET, SLICE2_OFFSET, SLICE3_OFFSET, BLOCK_N)
    adapter = tl.load(token_adapter_ptr + token)
    rank = slot_rank(adapter_rank_ptr, adapter, MAX_RANK)
    offs_r = tl.arange(0, BLOCK_R)
    # All R columns of B are read (they exist) and the products past the rank are dropped, so
    # the weight load does not wait on rank. (adapter as a vector: the interpreter rejects a mask
    # of scalar & vector.)
    has_adapter = tl.zeros((BLOCK_N,), tl.int32) + adapter >= 0
    w_ptrs = (weights_ptr + adapter.to(tl.int64) * W_STRIDE_ADAPTER
              + cols[:, None].to(tl.int64) * W_STRIDE_OUT + offs_r[None, :] * W_STRIDE_RANK)
    w = tl.load(w_ptrs, mask=(col_mask & has_adapter)[:, None] & (offs_r < MAX_RANK)[None, :],
                other=0.0)
    base_ptrs = base_ptr + token * BASE_STRIDE_ROW + cols
    base = tl.load(base_ptrs, mask=col_mask, other=0.0)
    in_rank = offs_r < rank
    y = tl.load(y_ptr + token * Y_STRIDE_ROW + (slice_idx * MAX_RANK + offs_r) * Y_STRIDE_COL,
                mask=in_rank, other=0.0)
    if rank > 0:  # tokens without adapter keep their base output untouched
        scaling = tl.load(adapter_scaling_ptr + adapter)
        products = w.to(tl.float32) * y.to(tl.float32)[None, :]
        delta = tl.sum(tl.where(in_rank[None, :], products, 0.0), axis=1)  # B past the rank may be NaN
        tl.store(base_ptrs, (base.to(tl.float32) + scaling * delta).to(base_ptr.dtype.element_ty),
                 mask=col_mask)


def _chunk_config(chunk_size: int, n_total: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Tiles by shape (deterministic, no autotuning: a CUDA-graph capture must not tune).
    One masked K step up to rank 64; beyond, two half-width steps, the second guarded."""
    block_n = 128
    if chunk_size <= 16 and n_total <= 8192:
        block_n = 64  # small decode batches: more programs in flight over a narrow output
    if dtype == torch.float32 and chunk_size >= 64:
        block_n = 64  # fp32 base tile and accumulator both live in registers
    k_max = max(16, next_power_of_2(max_rank))
    two_steps = k_max > 64
    block_k = k_max // 2 if two_steps else k_max
    return dict(block_n=block_n, block_k=block_k, two_steps=two_steps, num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=256)  # a model has a handful of slice layouts: ~1 us less per launch
def _slice_tiles(slice_offsets: tuple[int, ...], block_n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Static tile numbering: slice i owns tiles [first_tile[i], first_tile[i + 1]); its
    columns end at ends[i] (missing slices are empty, ending at the last offset)."""
    num_slices = len(slice_offsets) - 1
    if not 1 <= num_slices <= MAX_SLICES:
        raise ValueError(f"sgmv_expand supports 1 to {MAX_SLICES} slices, got {num_slices}")
    ends = list(slice_offsets[1:]) + [slice_offsets[-1]] * (MAX_SLICES - num_slices)
    first_tile = [0]
    for start, end in zip([0] + ends[:-1], ends):
        first_tile.append(first_tile[-1] + cdiv(end - start, block_n))
    return tuple(first_tile), tuple(ends)


def launch_per_token(y, weights, base_output, token_adapter, adapter_rank, adapter_scaling,
                     slice_offsets: list[int]) -> None:
    """base_output += the LoRA delta of every token, one program per (N tile, token)."""
    num_tokens = base_output.shape[0]
    if num_tokens == 0:
        return
    max_rank = weights.shape[2]
    block_r = max(16, next_power_of_2(max_rank))
    block_n = max(64, 8192 // block_r)  # an 8192-element B tile: 512 columns at rank 16, 128 at 64
    first_tile, ends = _slice_tiles(tuple(slice_offsets), block_n)
    num_n_tiles = first_tile[MAX_SLICES]
    pdl = dependent_launch(base_output)
    y_strides, w_strides = y.stride(), weights.stride()  # one tuple: stride(i) costs twice as much
    # grid: (N tiles of all slices x tokens,)
    _expand_per_token_kernel[grid_1d(num_n_tiles, num_tokens)](
        y, weights, base_output, token_adapter, adapter_rank, adapter_scaling,
        Y_STRIDE_ROW=y_strides[0], Y_STRIDE_COL=y_strides[1], W_STRIDE_ADAPTER=w_strides[0],
        W_STRIDE_OUT=w_strides[1], W_STRIDE_RANK=w_strides[2], BASE_STRIDE_ROW=base_output.stride()[0],
        SLICE1_FIRST_TILE=first_tile[1], SLICE2_FIRST_TILE=first_tile[2],
        SLICE1_OFFSET=ends[0], SLICE2_OFFSET=ends[1], SLICE3_OFFSET=ends[2],
        MAX_RANK=max_rank, NUM_N_TILES=num_n_tiles, BLOCK_N=block_n, BLOCK_R=block_r,
        DEPENDENT_LAUNCH=pdl, launch_pdl=pdl, num_warps=4,
    )


def launch_chunk(y, weights, base_output, token_order, chunk_adapter, chunk_start, chunk_len,
                 adapter_rank, adapter_scaling, slice_offsets: list[int], chunk_size: int,
                 permuted: bool, k_slices: int = 1, out: torch.Tensor | None = None) -> None:
    """base_output += the LoRA delta of every token, one program per (N tile, chunk); with
    ``out`` (base_output's shape and dtype), out = base_output + delta instead, every row
    written (the plan's chunks cover every token), or out = delta when base_output is None.
    ``k_slices`` > 1 (one output slice): y (s, k*R) and weights (L, out, k*R) hold k rank
    blocks, each within the slot's rank, summed: the shrink's input gradient in one pass."""
    out_of_place, has_base = out is not None, base_output is not None
    if not has_base:
        base_output = out  # never read (HAS_BASE off): the kernel's base pointer and the shape
    out = out if out_of_place else base_output
    num_tokens, n_total = base_output.shape
    if num_tokens == 0:
        return
    max_rank = weights.shape[2] // k_slices
    cfg = _chunk_config(chunk_size, n_total, max_rank, base_output.dtype)
    first_tile, ends = _slice_tiles(tuple(slice_offsets), cfg["block_n"])
    num_n_tiles = first_tile[MAX_SLICES]
    pdl = dependent_launch(base_output)
    # grid: (N tiles of all slices x chunks,)
    _expand_chunk_kernel[grid_1d(num_n_tiles, chunk_adapter.shape[0])](
        y, weights, base_output, out, token_order,
        chunk_adapter, chunk_start, chunk_len, adapter_rank, adapter_scaling,
        y.stride(0), y.stride(1), *weights.stride(), base_output.stride(0), out.stride(0),
        first_tile[1], first_tile[2], *ends,
        MAX_RANK=max_rank, NUM_N_TILES=num_n_tiles,
        BLOCK_M=chunk_size, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        TWO_STEPS=cfg["two_steps"], K_SLICES=k_slices, OUT_OF_PLACE=out_of_place, HAS_BASE=has_base,
        PERMUTED=permuted, IEEE_DOT=ieee_dot(base_output.dtype),
        DEPENDENT_LAUNCH=pdl, launch_pdl=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
