"""LoRA A (shrink): y[t, i*R + j] = x[t] . A[a(t), i*R + j, :] for j < rank.

Two kernels: ``launch_chunk`` runs one over the chunk plan (split K for decode-sized chunks),
``launch_per_token`` a per-token GEMV; the caller picks (lora_ops.dispatch). Tile choices and
what was measured for them: bench_results/NOTES.md.

Scaling is not applied here (expand applies it). Every element of y is written: zeros for rank
padding and for tokens without adapter, so the output can come from ``torch.empty``.
"""

import torch
import triton
import triton.language as tl

from .common import (CachedLaunch, cdiv, chunk_rows, dependent_launch, dot, grid_1d, ieee_dot, next_power_of_2,
                     slot_rank, tile_and_row_block, wait_for_previous_kernel)
from .workspace import arrival_counters


@CachedLaunch
@triton.jit
def _shrink_chunk_kernel(
    x_ptr, weight_ptr, out_ptr, partial_ptr, counter_ptr,
    token_order_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr, adapter_rank_ptr,
    in_features, x_stride_row, w_stride_adapter, w_stride_row, out_stride_row, partial_stride_split,
    N_TOTAL: tl.constexpr, MAX_RANK: tl.constexpr, TILES_PER_SLICE: tl.constexpr,
    NUM_N_TILES: tl.constexpr, FUSED_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, PERMUTED: tl.constexpr, IEEE_DOT: tl.constexpr,
    DEPENDENT_LAUNCH: tl.constexpr,
):
    wait_for_previous_kernel(DEPENDENT_LAUNCH)
    # N tile varies fastest, then the K split, so programs of one chunk share its x rows in L2.
    tile, chunk = tile_and_row_block(NUM_N_TILES * SPLIT_K)
    chunk_len = tl.load(chunk_len_ptr + chunk)
    if chunk_len == 0:
        return
    n_tile = tile % NUM_N_TILES
    split = tile // NUM_N_TILES

    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < chunk_len
    rows = chunk_rows(token_order_ptr, tl.load(chunk_start_ptr + chunk), offs_m, row_mask, PERMUTED)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    rank = slot_rank(adapter_rank_ptr, adapter, MAX_RANK)

    # Column j of y is weight row j; its index within its slice is j % MAX_RANK.
    if FUSED_SLICES:  # low rank: one tile spans every slice, so x is read once per chunk
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < N_TOTAL
        live = col_valid & (cols % MAX_RANK < rank)
    else:  # tiles never cross a slice, so a tile past the rank is skipped whole
        col_in_slice = (n_tile % TILES_PER_SLICE) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (n_tile // TILES_PER_SLICE) * MAX_RANK + col_in_slice
        col_valid = col_in_slice < MAX_RANK
        live = col_in_slice < rank
    tile_offs = rows[:, None] * out_stride_row + cols[None, :]  # int64
    out_mask = row_mask[:, None] & col_valid[None, :]
    if tl.max(live.to(tl.int32), axis=0) == 0:  # rank padding or no adapter: zeros, no weights
        if split == 0:  # every split takes this branch; one writes the zeros
            tl.store(out_ptr + tile_offs, tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty),
                     mask=out_mask)
        return

    offs_k = split * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * x_stride_row + offs_k[None, :]
    # Weight tile loaded as (K, N): rows past the rank are masked, never read.
    w_ptrs = (weight_ptr + adapter.to(tl.int64) * w_stride_adapter
              + cols[None, :].to(tl.int64) * w_stride_row + offs_k[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(split * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            w_tile = tl.load(w_ptrs, mask=live[None, :], other=0.0)
        else:
            k_mask = offs_k + (k - split * BLOCK_K) < in_features
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=live[None, :] & k_mask[:, None], other=0.0)
        acc += dot(x_tile, w_tile, IEEE_DOT)
        x_ptrs += BLOCK_K * SPLIT_K
        w_ptrs += BLOCK_K * SPLIT_K
    acc = tl.where(live[None, :], acc, 0.0)  # exact zeros past the rank, even for non-finite x
    if SPLIT_K == 1:
        tl.store(out_ptr + tile_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Split-K in one launch: store the fp32 partial, then count arrivals on this
        # (chunk, N tile)'s counter. The last split to arrive sums all partials in split order
        # (deterministic), writes the output and resets the counter to 0 for the next call.
        tl.store(partial_ptr + split.to(tl.int64) * partial_stride_split + tile_offs, acc,
                 mask=out_mask)
        tl.debug_barrier()  # every thread's partial store precedes the release below
        counter = counter_ptr + chunk * NUM_N_TILES + n_tile
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            partial_ptrs = partial_ptr + tile_offs
            for _ in tl.static_range(SPLIT_K):  # .cg: read from L2, where the other SMs wrote
                total += tl.load(partial_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
                partial_ptrs += partial_stride_split
            tl.store(out_ptr + tile_offs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)


@CachedLaunch
@triton.jit
def _shrink_per_token_kernel(
    x_ptr, weight_ptr, out_ptr, token_adapter_ptr, adapter_rank_ptr,
    # strides are fixed per model: as constexprs they leave the launch key only tensors (host time)
    X_STRIDE_ROW: tl.constexpr, W_STRIDE_ADAPTER: tl.constexpr, W_STRIDE_ROW: tl.constexpr,
    OUT_STRIDE_ROW: tl.constexpr, IN_FEATURES: tl.constexpr, N_TOTAL: tl.constexpr, MAX_RANK: tl.constexpr,
    NUM_N_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EXIT_WITHOUT_ADAPTER: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    wait_for_previous_kernel(DEPENDENT_LAUNCH)
    # One program per (BLOCK_N columns, token), a GEMV without the chunk plan: with a handful of
    # tokens, re-reading the adapter's rows per token costs less than the plan's dependent loads
    # and a split-K reduction. Every load depends only on the token's adapter.
    col_tile, token = tile_and_row_block(NUM_N_TILES)
    token = token.to(tl.int64)
    adapter = tl.load(token_adapter_ptr + token)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N_TOTAL
    out_ptrs = out_ptr + token * OUT_STRIDE_ROW + cols
    if EXIT_WITHOUT_ADAPTER:
        if adapter < 0:  # no adapter (or padding): zeros, x is not read
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), out_ptr.dtype.element_ty), mask=col_valid)
            return
    rank = slot_rank(adapter_rank_ptr, adapter, MAX_RANK)
    # Rows past the rank are read too (they exist) and zeroed below: loading does not wait on rank.
    w_rows = (weight_ptr + adapter.to(tl.int64) * W_STRIDE_ADAPTER
              + cols[:, None].to(tl.int64) * W_STRIDE_ROW)
    # (adapter as a vector: the Triton interpreter rejects a mask of scalar & vector)
    w_mask = (col_valid & (tl.zeros((BLOCK_N,), tl.int32) + adapter >= 0))[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(0, IN_FEATURES, BLOCK_K):  # unrolled: all loads issue up front
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN_FEATURES
        x = tl.load(x_ptr + token * X_STRIDE_ROW + offs_k, mask=k_mask, other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    live = col_valid & (cols % MAX_RANK < rank)
    y = tl.where(live, tl.sum(acc, axis=1), 0.0)  # exact zeros past the rank
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=col_valid)


def _chunk_config(chunk_size: int, n_total: int, in_features: int, max_rank: int,
                  dtype: torch.dtype, num_tokens: int) -> dict:
    """Tiles by shape (deterministic, no autotuning: a CUDA-graph capture must not tune).

    Decode-sized chunks (<= 32 tokens): a program's K loop is latency-bound, so K is split; an
    N tile never crosses a slice, so a tile past an adapter's rank is skipped whole. Prefill:
    ``_prefill_config``. num_tokens is a tensor size, so the choice is graph-safe.
    """
    if chunk_size >= 64:
        config = _prefill_config(chunk_size, n_total, max_rank, num_tokens)
    else:
        slice_width = max(16, next_power_of_2(max_rank))
        block_n = min(slice_width, 16 if chunk_size <= 16 else 64)
        if num_tokens <= 4:  # at most 4 live chunks: one 256-wide K tile per program
            config = dict(BLOCK_K=256, SPLIT_K=16, num_warps=4, num_stages=1)
        elif chunk_size <= 16:
            config = dict(BLOCK_K=128, SPLIT_K=8, num_warps=2, num_stages=3)
        else:
            config = dict(BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3)
        config["BLOCK_N"] = block_n
    if dtype == torch.float32:  # twice the shared memory per element
        config["BLOCK_K"] = min(config["BLOCK_K"], 32)
    config["SPLIT_K"] = max(1, min(config["SPLIT_K"], in_features // config["BLOCK_K"]))
    return config


def _prefill_config(chunk_size: int, n_total: int, max_rank: int, num_tokens: int) -> dict:
    """Prefill tiles. All slices' columns fit one tile (n_total <= 64, e.g. rank 16 on 3
    slices): FUSED_SLICES, x read once per chunk; K split when there are fewer than 128 chunks,
    so the SMs fill. Wider (rank >= 32 on several slices): one program per slice tile, 128
    columns wide from rank 128; K split in two for few tiles."""
    tiles = cdiv(num_tokens, chunk_size)  # live chunks, about (a tensor size)
    if n_total <= 64:
        config = dict(FUSED=True, BLOCK_N=max(16, next_power_of_2(n_total)),
                      BLOCK_K=128, SPLIT_K=1, num_warps=8,
                      num_stages=5 if chunk_size <= 64 else 3)  # 5 x 32 KB of shared memory
        if tiles < 128:  # fp32 partials are small next to x
            config.update(SPLIT_K=4 if tiles < 64 else 2, num_warps=4,
                          num_stages=4 if chunk_size <= 64 else 3)
        elif n_total > 32 and chunk_size <= 64:
            config.update(BLOCK_K=64, num_stages=8)
        return config
    num_slices = n_total // max_rank
    # Fewer (chunk, slice) tiles than SMs (a 2048-token prefill): K split in two fills them where
    # measured faster (H100: rank 64 on 2-3 slices, rank 128 on 2 slices; 0.48-0.78x the time).
    few_tiles = tiles * num_slices < 128
    if max_rank >= 128:  # a whole 128-column slice per tile (H100, rank 128: gate-up 1.4-1.5x faster)
        # 3 stages (72 KB) fit 3 programs per SM where 4 fit 2: a qkv of 8192 tokens (384
        # tiles) runs in one wave on 132 SMs (0.71-0.76x the time). With few tiles qkv is
        # fastest unsplit, 4 stages.
        return dict(BLOCK_N=128, BLOCK_K=64, SPLIT_K=2 if few_tiles and num_slices == 2 else 1,
                    num_warps=8, num_stages=3 if num_slices >= 3 and not few_tiles else 4)
    block_n = min(64, max(16, next_power_of_2(max_rank)))
    if block_n == 64:  # rank >= 64: tensor-core bound, 8 warps at the 128-row tile
        # a 5th stage helps 2 slice tiles (gate-up) and costs residency with 3 (qkv)
        return dict(BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=2 if few_tiles else 1,
                    num_warps=8 if chunk_size >= 128 else 4,
                    num_stages=5 if n_total <= 128 else 4)
    return dict(BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=1, num_warps=8, num_stages=3)


def launch_per_token(x, weights, token_adapter, adapter_rank, num_slices: int) -> torch.Tensor:
    """y (s, num_slices*R) by the per-token GEMV; every element written."""
    num_tokens, in_features = x.shape
    n_total = weights.shape[1]
    out = x.new_empty((num_tokens, n_total))
    if num_tokens == 0 or n_total == 0:
        return out
    # 2 columns x 4 warps up to 64 tokens, 4 x 2 beyond (bench_results/NOTES.md). Up to 64
    # tokens a program without adapter exits before reading x (H100, 32 tokens: no-adapter decode
    # step 1.3 % faster, gate-up shrink 4 % faster, qkv rank 64 on triton 3 % slower); beyond,
    # waiting for the adapter before the x loads cost 10 % at 256 tokens.
    small = num_tokens <= 64
    block_n, num_warps = (2, 4) if small else (4, 2)
    num_n_tiles = cdiv(n_total, block_n)
    pdl = dependent_launch(out)
    w_strides = weights.stride()  # one tuple: stride(i) costs twice as much
    # grid: (column tiles x tokens,)
    _shrink_per_token_kernel[grid_1d(num_n_tiles, num_tokens)](
        x, weights, out, token_adapter, adapter_rank,
        X_STRIDE_ROW=x.stride()[0], W_STRIDE_ADAPTER=w_strides[0], W_STRIDE_ROW=w_strides[1],
        OUT_STRIDE_ROW=n_total, IN_FEATURES=in_features, N_TOTAL=n_total, MAX_RANK=n_total // num_slices,
        NUM_N_TILES=num_n_tiles, BLOCK_N=block_n,
        BLOCK_K=min(2048, next_power_of_2(in_features)), EXIT_WITHOUT_ADAPTER=small,
        DEPENDENT_LAUNCH=pdl, launch_pdl=pdl, num_warps=num_warps,
    )
    return out


def launch_chunk(x, weights, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
                 num_slices: int, chunk_size: int, permuted: bool) -> torch.Tensor:
    """y (s, num_slices*R) by the chunk-plan kernel (permuted: the adapter-sorted plan); every
    element written."""
    num_tokens, in_features = x.shape
    n_total = weights.shape[1]
    max_rank = n_total // num_slices
    out = x.new_empty((num_tokens, n_total))
    if num_tokens == 0 or n_total == 0:
        return out
    cfg = _chunk_config(chunk_size, n_total, in_features, max_rank, x.dtype, num_tokens)
    block_n, block_k, split_k = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    num_chunks = chunk_adapter.shape[0]  # static upper bound: counters for every grid chunk
    fused_slices = cfg.get("FUSED", False)
    tiles_per_slice = cdiv(max_rank, block_n)
    num_n_tiles = cdiv(n_total, block_n) if fused_slices else num_slices * tiles_per_slice
    if split_k == 1:
        partial, counters = out, out  # not read
    else:  # one launch: fp32 partials + per-(chunk, N tile) arrival counters
        partial = torch.empty((split_k, num_tokens, n_total), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, num_chunks * num_n_tiles)
    pdl = dependent_launch(out)
    # grid: (N tiles x K splits x chunks,)
    _shrink_chunk_kernel[grid_1d(num_n_tiles * split_k, num_chunks)](
        x, weights, out, partial, counters,
        token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
        in_features, x.stride(0), weights.stride(0), weights.stride(1), n_total,
        num_tokens * n_total,
        N_TOTAL=n_total, MAX_RANK=max_rank, TILES_PER_SLICE=tiles_per_slice,
        NUM_N_TILES=num_n_tiles, FUSED_SLICES=fused_slices,
        BLOCK_M=chunk_size, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=in_features % (block_k * split_k) == 0, PERMUTED=permuted,
        IEEE_DOT=ieee_dot(x.dtype), DEPENDENT_LAUNCH=pdl, launch_pdl=pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
