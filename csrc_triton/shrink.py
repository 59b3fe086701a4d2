"""LoRA A (shrink): y[t, i*R + j] = x[t] . A[a(t), i*R + j, :] for j < rank.

Two kernels: one over the chunk plan (split K for decode-sized chunks), and a per-token GEMV
for small decode batches; ``_use_per_token`` picks by sizes.

Scaling is not applied here (expand applies it). Every element of y is written: zeros for rank
padding and for tokens without adapter, so the output can come from ``torch.empty``.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, weight_ptr, out_ptr, partial_ptr, counter_ptr,
    token_order_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr, adapter_rank_ptr,
    in_features, stride_xm, stride_wl, stride_wn, stride_om, stride_split,
    N_TOTAL: tl.constexpr, MAX_RANK: tl.constexpr, TILES_PER_SLICE: tl.constexpr,
    NUM_N_TILES: tl.constexpr, FUSED_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, PERMUTED: tl.constexpr, IEEE_FP32: tl.constexpr,
):
    # N tile varies fastest, then the K split, so programs of one chunk share its x rows in L2.
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    chunk_len = tl.load(chunk_len_ptr + chunk)
    if chunk_len == 0:
        return
    n_tile = tile % NUM_N_TILES
    split = tile // NUM_N_TILES

    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < chunk_len
    positions = tl.load(chunk_start_ptr + chunk) + offs_m
    if PERMUTED:
        rows = tl.load(token_order_ptr + positions, mask=row_mask, other=0)
    else:
        rows = positions
    rows = rows.to(tl.int64)

    adapter = tl.load(chunk_adapter_ptr + chunk)
    rank = tl.load(adapter_rank_ptr + adapter, mask=adapter >= 0, other=0)
    rank = tl.minimum(rank, MAX_RANK)  # a rank above R must not spill into the next slice

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
    tile_offs = rows[:, None] * stride_om + cols[None, :]  # int64
    out_mask = row_mask[:, None] & col_valid[None, :]
    if tl.max(live.to(tl.int32), axis=0) == 0:  # rank padding or no adapter: zeros, no weights
        if split == 0:  # every split takes this branch; one writes the zeros
            tl.store(out_ptr + tile_offs, tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty),
                     mask=out_mask)
        return

    offs_k = split * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    # Weight tile loaded as (K, N): rows past the rank are masked, never read.
    w_ptrs = (weight_ptr + adapter.to(tl.int64) * stride_wl
              + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(split * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            w_tile = tl.load(w_ptrs, mask=live[None, :], other=0.0)
        else:
            k_mask = offs_k + (k - split * BLOCK_K) < in_features
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=live[None, :] & k_mask[:, None], other=0.0)
        if IEEE_FP32:
            acc += tl.dot(x_tile, w_tile, input_precision="ieee")
        else:
            acc += tl.dot(x_tile, w_tile)
        x_ptrs += BLOCK_K * SPLIT_K
        w_ptrs += BLOCK_K * SPLIT_K
    acc = tl.where(live[None, :], acc, 0.0)  # exact zeros past the rank, even for non-finite x
    if SPLIT_K == 1:
        tl.store(out_ptr + tile_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Split-K in one launch: store the fp32 partial, then count arrivals on this
        # (chunk, N tile)'s counter. The last split to arrive sums all partials in split order
        # (deterministic), writes the output and resets the counter to 0 for the next call.
        tl.store(partial_ptr + split.to(tl.int64) * stride_split + tile_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial store precedes the release below
        counter = counter_ptr + chunk * NUM_N_TILES + n_tile
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            partial_ptrs = partial_ptr + tile_offs
            for _ in tl.static_range(SPLIT_K):  # .cg: read from L2, where the other SMs wrote
                total += tl.load(partial_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
                partial_ptrs += stride_split
            tl.store(out_ptr + tile_offs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)


@triton.jit
def _shrink_per_token_kernel(
    x_ptr, weight_ptr, out_ptr, token_adapter_ptr, adapter_rank_ptr,
    stride_xm, stride_wl, stride_wn, stride_om,
    IN_FEATURES: tl.constexpr, N_TOTAL: tl.constexpr, MAX_RANK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (BLOCK_N columns, token), a GEMV without the chunk plan: with a handful of
    # tokens, re-reading the adapter's rows per token costs less than the plan's dependent loads
    # and a split-K reduction. Every load depends only on the token's adapter.
    col_tile = tl.program_id(0)
    token = tl.program_id(1).to(tl.int64)
    adapter = tl.load(token_adapter_ptr + token)
    rank = tl.load(adapter_rank_ptr + adapter, mask=adapter >= 0, other=0)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N_TOTAL
    # Rows past the rank are read too (they exist) and zeroed below: loading does not wait on rank.
    w_rows = weight_ptr + adapter.to(tl.int64) * stride_wl + cols[:, None].to(tl.int64) * stride_wn
    # (adapter as a vector: the Triton interpreter rejects a mask of scalar & vector)
    w_mask = (col_valid & (tl.zeros((BLOCK_N,), tl.int32) + adapter >= 0))[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(0, IN_FEATURES, BLOCK_K):  # unrolled: all loads issue up front
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN_FEATURES
        x = tl.load(x_ptr + token * stride_xm + offs_k, mask=k_mask, other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    live = col_valid & (cols % MAX_RANK < tl.minimum(rank, MAX_RANK))
    y = tl.where(live, tl.sum(acc, axis=1), 0.0)  # exact zeros past the rank
    tl.store(out_ptr + token * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=col_valid)


def _shrink_config(chunk_size: int, n_total: int, in_features: int, max_rank: int,
                   dtype: torch.dtype, num_tokens: int = 0) -> dict:
    """Tile sizes by shape (deterministic, no autotuning: a CUDA-graph capture must not tune).

    Decode (chunk_size <= 32, _shrink_kernel): BLOCK_N never crosses a slice (it is at most the
    slice width R, rounded to a power of two), so a tile past an adapter's rank is skipped whole.
    Prefill (chunk_size >= 64): see _prefill_config.
    Measured on an H200, bf16, in = 4096 (bench_results/NOTES.md). num_tokens is a tensor size,
    so the choice is graph-safe.
    """
    if chunk_size >= 64:
        config = _prefill_config(chunk_size, n_total, max_rank, num_tokens)
    else:  # decode: a program's K loop is latency-bound, so split K to put more SMs to work
        slice_width = max(16, triton.next_power_of_2(max_rank))
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
    """Prefill tiles (H200, bf16, in = 4096, 20 calls in a CUDA graph; bench_results/NOTES.md).

    All slices' columns fit one tile (n_total <= 64, e.g. rank 16 on 3 slices):
    _shrink_kernel with FUSED_SLICES, x read once per chunk instead of once per slice tile
    (8192 tokens: 25.3 -> 22.4 us qkv, 23.5 -> 21.4 us gate-up). With fewer than 128 chunks
    the K loop is split so the SMs fill (2048 tokens: 11.5 -> 8.8 us qkv; 4096 tokens:
    16.4 -> 11.5 us qkv). Wider (n_total > 64, e.g. rank 64): _shrink_kernel, one program per
    slice tile; fusing the slices of rank 64 into one program (128 or 256 columns, or 2-3 dots
    per K step) measured 10-50% slower there.
    """
    tiles = triton.cdiv(num_tokens, chunk_size)  # live chunks, about (a tensor size)
    if n_total <= 64:
        config = dict(FUSED=True, BLOCK_N=max(16, triton.next_power_of_2(n_total)),
                      BLOCK_K=128, SPLIT_K=1, num_warps=8,
                      num_stages=5 if chunk_size <= 64 else 3)  # 5 x 32 KB of shared memory
        if tiles < 128:  # fp32 partials are small next to x
            config.update(SPLIT_K=4 if tiles < 64 else 2, num_warps=4,
                          num_stages=4 if chunk_size <= 64 else 3)
        elif n_total > 32 and chunk_size <= 64:  # 64-column tile (qkv r16): 22.6 -> 21.7 us
            config.update(BLOCK_K=64, num_stages=8)
        return config
    block_n = min(64, max(16, triton.next_power_of_2(max_rank)))
    if block_n == 64:  # rank >= 64: tensor-core bound, 8 warps at the 128-row tile
        # 2 slice tiles (gate-up): a 5th stage is faster (28.8 -> 26.3 us); with 3 (qkv) it
        # costs residency (3 programs of 4 stages per SM) and is slower (35.0 -> 47.9 us).
        return dict(BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=1,
                    num_warps=8 if chunk_size >= 128 else 4,
                    num_stages=5 if n_total <= 128 else 4)
    return dict(BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=1, num_warps=8, num_stages=3)


# Arrival counters of the split-K kernel, int32, all zero between calls (the last split of
# each tile resets its counter): one buffer per device, grown only outside graph capture.
# Measured on an H200, this beats a torch.zeros per call by 0.6-0.9 us inside a graph.
_MIN_COUNTERS = 1 << 14
_counters: dict = {}
_retired: list = []  # outgrown buffers stay alive: graphs captured earlier still point at them


def _arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    # One buffer per device shared by all streams: shrink calls must not run concurrently on two
    # streams of one device (like a cuBLAS workspace); stream-ordered calls and replays are safe.
    buffer = _counters.get(device)
    if buffer is None or buffer.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"lora sgmv_shrink: the split-K arrival counters of {device} must grow to {needed} "
                "entries during CUDA-graph capture; run the op once with this batch shape (or a "
                "larger one) before capturing")
        if buffer is not None:
            _retired.append(buffer)
        buffer = torch.zeros(max(needed, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _counters[device] = buffer
    return buffer


def _use_per_token(num_tokens: int, num_chunks: int, n_total: int) -> bool:
    """Whether _shrink_per_token_kernel beats the chunk kernel (sizes only, so graph-safe).

    Measured on an H200 in bf16 (in = 4096, 1-64 one-token sequences over 8 adapters): the
    per-token kernel takes 1.8-2.2 us at 1 token against 4.0-4.8 us for the chunk kernel, and
    stays faster up to about 4096 outputs (32 tokens x 3 slices of rank 16: 3.3 vs 5.1 us).
    Beyond, the chunk kernel's reuse of the adapter's rows wins on a sorted plan, but not on
    a plan with as many chunks as tokens (one-token segments: 64 tokens x 192: 14 vs 24 us;
    256 tokens x 48: 13 vs 38 us).
    """
    return num_tokens * n_total <= 4096 or num_chunks >= num_tokens


def _launch_per_token(x, weights, out, token_adapter, adapter_rank, max_rank: int) -> None:
    """Tiles measured as above: 2 columns x 4 warps within 0.2 us of the best of 36 tile shapes
    up to 64 tokens; beyond, 4 columns x 2 warps (256 tokens x 48: 13.5 vs 15.2 us)."""
    num_tokens, in_features = x.shape
    n_total = weights.shape[1]
    block_n, num_warps = (2, 4) if num_tokens <= 64 else (4, 2)
    # grid: (column tiles, tokens)
    _shrink_per_token_kernel[(triton.cdiv(n_total, block_n), num_tokens)](
        x, weights, out, token_adapter, adapter_rank,
        x.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
        IN_FEATURES=in_features, N_TOTAL=n_total, MAX_RANK=max_rank,
        BLOCK_N=block_n, BLOCK_K=min(2048, triton.next_power_of_2(in_features)),
        num_warps=num_warps,
    )


def sgmv_shrink(x, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                adapter_rank, num_slices: int, chunk_size: int, permuted: bool) -> torch.Tensor:
    """y (s, num_slices*R) = per-token x @ A[a].T, by the chunk plan's kernel or the per-token
    one (_use_per_token); every element written."""
    num_tokens, in_features = x.shape
    n_total = weights.shape[1]
    max_rank = n_total // num_slices
    out = torch.empty((num_tokens, n_total), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or n_total == 0:  # nothing to write
        return out
    if _use_per_token(num_tokens, chunk_adapter.shape[0], n_total):
        _launch_per_token(x, weights, out, token_adapter, adapter_rank, max_rank)
        return out
    cfg = _shrink_config(chunk_size, n_total, in_features, max_rank, x.dtype, num_tokens)
    block_n, block_k, split_k = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    num_chunks = chunk_adapter.shape[0]  # static upper bound: counters for every grid chunk
    fused_slices = cfg.get("FUSED", False)
    tiles_per_slice = triton.cdiv(max_rank, block_n)
    num_n_tiles = triton.cdiv(n_total, block_n) if fused_slices else num_slices * tiles_per_slice
    if split_k == 1:
        partial, counters = out, out  # not read
    else:  # one launch: fp32 partials + per-(chunk, N tile) arrival counters
        partial = torch.empty((split_k, num_tokens, n_total), dtype=torch.float32,
                              device=x.device)
        counters = _arrival_counters(x.device, num_chunks * num_n_tiles)
    # grid: (N tiles x K splits, chunks)
    grid = (num_n_tiles * split_k, num_chunks)
    _shrink_kernel[grid](
        x, weights, out, partial, counters,
        token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
        in_features, x.stride(0), weights.stride(0), weights.stride(1), n_total,
        num_tokens * n_total,
        N_TOTAL=n_total, MAX_RANK=max_rank, TILES_PER_SLICE=tiles_per_slice,
        NUM_N_TILES=num_n_tiles, FUSED_SLICES=fused_slices,
        BLOCK_M=chunk_size, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=in_features % (block_k * split_k) == 0, PERMUTED=permuted,
        IEEE_FP32=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
