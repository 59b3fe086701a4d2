"""Backward of the LoRA ops (the formulas are stated in ``lora_ops/ops.py``, "training").

- Activation gradients are the forward's segmented GEMMs transposed, so they run the forward
  kernels: ``dx`` of shrink is an expand with A read transposed as B (the expand kernels take
  any weight strides) and scaling 1, the slices summed in one pass by the chunk kernel (one
  per-token launch per slice); ``dy`` of expand is a shrink
  over the output slice with ``c * B`` transposed into a small contiguous (L, R, width) tensor.
- Weight gradients are reductions over each adapter's tokens (``_segment_outer_kernel``): one
  program per (output tile, group of consecutive chunks of the plan) finds the runs of one
  adapter among its chunks, walks each run's positions in fixed steps and adds the run's sum
  into that adapter's fp32 gradient with atomics. In the adapter-sorted plan (csgmv) an
  adapter's chunks are consecutive, so a program adds about once; in token order (triton),
  once per run of one adapter in its group. A group's size comes from tensor sizes only.
- The embedding's A gradient is a scatter-add (atomics) of ``dy`` into the vocabulary columns.

No host synchronisation: a training step can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from . import expand, shrink
from .embedding import token_block_entries
from .common import (CachedLaunch, cdiv, chunk_rows, dot, grid_1d, ieee_dot, next_power_of_2, slot_rank,
                     tile_and_row_block)

# Programs a weight-gradient launch aims for: fewer make each program walk more tokens, more
# make more atomic adds (H100 sweep of 128-512 programs x 64/128-token steps: bench_results/NOTES.md).
_TARGET_PROGRAMS = 256
# Most chunks one program takes (their adapters are loaded as one vector of this length)
_MAX_GROUP = 256
# Tokens per step of the weight-gradient loop (the K of its dot)
_BLOCK_T = 64


@triton.jit
def _add_into_slot(out_ptr, acc, slot, adapter_rank_ptr, offs_m, offs_n, m_size, n_size,
                   out_stride_adapter, out_stride_m, MAX_RANK: tl.constexpr, RANK_ON_M: tl.constexpr):
    """out[slot, m, n] += acc for the (m, n) within slot's rank; nothing for slot -1."""
    if slot >= 0:
        rank = slot_rank(adapter_rank_ptr, slot, MAX_RANK)
        if RANK_ON_M:  # rows m of the stacked slices: index within the slice is m % MAX_RANK
            in_rank = ((offs_m % MAX_RANK) < rank)[:, None]
        else:
            in_rank = (offs_n < rank)[None, :]
        live = in_rank & (offs_m < m_size)[:, None] & (offs_n < n_size)[None, :]
        out_ptrs = (out_ptr + slot.to(tl.int64) * out_stride_adapter
                    + offs_m[:, None].to(tl.int64) * out_stride_m + offs_n[None, :])
        tl.atomic_add(out_ptrs, tl.where(live, acc, 0.0), mask=live, sem="relaxed")  # a sum: no ordering needed


@CachedLaunch
@triton.jit
def _segment_outer_kernel(
    p_ptr, q_ptr, out_ptr, token_order_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr,
    adapter_rank_ptr, num_chunks, chunks_per_program, m_size, n_size,
    p_stride_row, q_stride_row, out_stride_adapter, out_stride_m,
    MAX_RANK: tl.constexpr, RANK_ON_M: tl.constexpr, NUM_M_TILES: tl.constexpr,
    NUM_TILES: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # out[a, m, n] += sum over the tokens t of adapter a of p[t, m] * q[t, n] (fp32 out)
    tile, group = tile_and_row_block(NUM_TILES)
    offs_m = (tile % NUM_M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile // NUM_M_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    m_mask = offs_m < m_size
    n_mask = offs_n < n_size
    first = group * chunks_per_program
    last = tl.minimum(first + chunks_per_program, num_chunks)
    # The plans cut each run of one adapter into consecutive chunks over consecutive positions,
    # so consecutive chunks of one adapter cover one range of positions: the program walks that
    # range in BLOCK_T steps with no per-chunk work in the loop (which Triton then pipelines).
    group_chunks = first + tl.arange(0, GROUP)
    group_adapters = tl.load(chunk_adapter_ptr + group_chunks, mask=group_chunks < last, other=-1)
    previous_adapters = tl.load(chunk_adapter_ptr + group_chunks - 1, mask=(group_chunks > first) & (group_chunks < last),
                                other=-1)
    opens_run = (group_chunks < last) & ((group_chunks == first) | (group_adapters != previous_adapters))
    chunk = first
    while chunk < last:
        adapter = tl.load(chunk_adapter_ptr + chunk)
        next_run = tl.min(tl.where(opens_run & (group_chunks > chunk), group_chunks, last))
        start = tl.load(chunk_start_ptr + chunk)
        end = tl.load(chunk_start_ptr + next_run - 1) + tl.load(chunk_len_ptr + next_run - 1)
        if slot_rank(adapter_rank_ptr, adapter, MAX_RANK) > 0:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # Token rows loaded one step ahead: in the sorted plan a step's tile loads then wait on
            # no load of the same step, and the loop keeps num_stages steps in flight (else one).
            next_rows = chunk_rows(token_order_ptr, start, offs_t, start + offs_t < end, PERMUTED)
            for position in range(start, end, BLOCK_T):
                row_mask = position + offs_t < end
                rows = next_rows
                next_rows = chunk_rows(token_order_ptr, position + BLOCK_T, offs_t,
                                       position + BLOCK_T + offs_t < end, PERMUTED)
                p = tl.load(p_ptr + rows[:, None] * p_stride_row + offs_m[None, :],
                            mask=row_mask[:, None] & m_mask[None, :], other=0.0)
                q = tl.load(q_ptr + rows[:, None] * q_stride_row + offs_n[None, :],
                            mask=row_mask[:, None] & n_mask[None, :], other=0.0)
                acc += dot(tl.trans(p), q, IEEE_DOT)
            _add_into_slot(out_ptr, acc, adapter, adapter_rank_ptr, offs_m, offs_n, m_size, n_size,
                           out_stride_adapter, out_stride_m, MAX_RANK, RANK_ON_M)
        chunk = next_run


def _segment_outer(p, q, out, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
                   max_rank: int, rank_on_m: bool, permuted: bool) -> None:
    """out[a] += p_aᵀ q_a over each adapter a's tokens, within a's rank (on out's rows m modulo
    ``max_rank`` when ``rank_on_m``, else on its columns n). out: fp32 (L, M, N), last dim contiguous."""
    num_tokens, m_size = p.shape
    n_size = q.shape[1]
    num_chunks = chunk_adapter.shape[0]
    if num_tokens == 0 or m_size == 0 or n_size == 0 or num_chunks == 0:
        return
    block_m = min(64, max(16, next_power_of_2(m_size)))
    block_n = min(128, max(16, next_power_of_2(n_size)))
    if p.dtype == torch.float32:
        block_n = min(block_n, 64)  # fp32 tiles: half the registers' worth
    num_m_tiles = cdiv(m_size, block_m)
    num_tiles = num_m_tiles * cdiv(n_size, block_n)
    groups = max(min(num_chunks, _TARGET_PROGRAMS // num_tiles), cdiv(num_chunks, _MAX_GROUP), 1)
    chunks_per_program = cdiv(num_chunks, groups)
    # grid: (output tiles x chunk groups,)
    _segment_outer_kernel[grid_1d(num_tiles, cdiv(num_chunks, chunks_per_program))](
        p, q, out, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
        num_chunks, chunks_per_program, m_size, n_size,
        p.stride(0), q.stride(0), out.stride(0), out.stride(1),
        MAX_RANK=max_rank, RANK_ON_M=rank_on_m, NUM_M_TILES=num_m_tiles, NUM_TILES=num_tiles,
        GROUP=next_power_of_2(chunks_per_program), BLOCK_T=_BLOCK_T, BLOCK_M=block_m, BLOCK_N=block_n,
        PERMUTED=permuted, IEEE_DOT=ieee_dot(p.dtype), num_warps=8, num_stages=3,
    )


# The four matmul gradients share one calling convention, the gradient op's arguments:
# (gradient, tensor, token_adapter, the plan's four tensors, adapter_rank, the op's own arguments,
# chunk_size, permuted, per_token). The weight gradients walk the plan: they read neither
# token_adapter nor per_token.


def sgmv_shrink_grad_weights(grad_y, x, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                             adapter_rank, num_slices: int, chunk_size: int, permuted: bool,
                             per_token: bool) -> torch.Tensor:
    """dA (L, n*R, in): dA[a, slice i rows] = dy_a[:, slice i, :r]ᵀ x_a."""
    grad_w = torch.zeros(adapter_rank.shape[0], grad_y.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    _segment_outer(grad_y, x, grad_w, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
                   grad_y.shape[1] // num_slices, True, permuted)
    return grad_w.to(x.dtype)


def sgmv_expand_grad_weights(grad_out, y, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                             adapter_rank, adapter_scaling, slice_offsets, chunk_size: int, permuted: bool,
                             per_token: bool) -> torch.Tensor:
    """dB (L, out, R): dB[a, slice i cols, :r] = c_a * dout_a[:, cols]ᵀ y_a[:, slice i, :r]."""
    max_rank = y.shape[1] // (len(slice_offsets) - 1)
    grad_w = torch.zeros(adapter_rank.shape[0], grad_out.shape[1], max_rank, dtype=torch.float32, device=y.device)
    for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
        _segment_outer(grad_out[:, lo:hi], y[:, i * max_rank : (i + 1) * max_rank], grad_w[:, lo:hi],
                       token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank, max_rank, False,
                       permuted)
    return (grad_w * adapter_scaling[:, None, None]).to(y.dtype)


def sgmv_shrink_grad_x(grad_y, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                       adapter_rank, num_slices: int, chunk_size: int, permuted: bool,
                       per_token: bool) -> torch.Tensor:
    """dx (s, in) = sum_i dy[:, slice i, :r] @ A[a, slice i rows]: the expand kernel with A read
    transposed as B (L, in, n*R) and scaling 1 -- the chunk kernel writes every row of dx in one
    pass over the slices; the per-token kernel accumulates into zeros, one launch per slice."""
    max_rank = weights.shape[1] // num_slices
    in_features = weights.shape[2]
    unit_scaling = torch.ones(adapter_rank.shape[0], dtype=torch.float32, device=grad_y.device)
    if not per_token:
        grad_x = torch.empty(grad_y.shape[0], in_features, dtype=grad_y.dtype, device=grad_y.device)
        expand.launch_chunk(grad_y, weights.transpose(1, 2), None, token_order, chunk_adapter, chunk_start,
                            chunk_len, adapter_rank, unit_scaling, [0, in_features], chunk_size, permuted,
                            k_slices=num_slices, out=grad_x)
        return grad_x
    grad_x = torch.zeros(grad_y.shape[0], in_features, dtype=grad_y.dtype, device=grad_y.device)
    for i in range(num_slices):
        rows = slice(i * max_rank, (i + 1) * max_rank)
        expand.launch_per_token(grad_y[:, rows], weights[:, rows].transpose(1, 2), grad_x, token_adapter,
                                adapter_rank, unit_scaling, [0, in_features])
    return grad_x


def sgmv_expand_grad_y(grad_out, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                       adapter_rank, adapter_scaling, slice_offsets, chunk_size: int, permuted: bool,
                       per_token: bool) -> torch.Tensor:
    """dy (s, n*R): dy[:, slice i, :r] = c * dout[:, slice i cols] @ B[a, cols, :r]: per slice,
    the shrink kernel with c * B's slice transposed into a contiguous A (L, R, width)."""
    parts = []
    for lo, hi in zip(slice_offsets[:-1], slice_offsets[1:]):
        scaled = weights[:, lo:hi].float() * adapter_scaling[:, None, None]
        b_as_a = scaled.to(weights.dtype).transpose(1, 2).contiguous()
        dout_slice = grad_out[:, lo:hi]
        if per_token:
            parts.append(shrink.launch_per_token(dout_slice, b_as_a, token_adapter, adapter_rank, 1))
        else:
            parts.append(shrink.launch_chunk(dout_slice, b_as_a, token_order, chunk_adapter, chunk_start,
                                             chunk_len, adapter_rank, 1, chunk_size, permuted))
    return torch.cat(parts, dim=1)


@CachedLaunch
@triton.jit
def _embedding_grad_kernel(
    grad_y_ptr, token_ids_ptr, out_ptr, token_adapter_ptr, adapter_rank_ptr,
    num_tokens, vocab_size, grad_stride_row, out_stride_adapter, out_stride_row,
    MAX_RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[a(t), j, ids[t]] += dy[t, j] for j < rank; the forward's gather, as a scatter-add
    tokens, _, ids, adapter, offs_r, entries = token_block_entries(
        token_ids_ptr, token_adapter_ptr, adapter_rank_ptr, num_tokens, vocab_size,
        MAX_RANK, BLOCK_T, BLOCK_R)
    grad = tl.load(grad_y_ptr + tokens.to(tl.int64)[:, None] * grad_stride_row + offs_r[None, :],
                   mask=entries, other=0.0)
    out_ptrs = (out_ptr + adapter.to(tl.int64)[:, None] * out_stride_adapter
                + offs_r[None, :].to(tl.int64) * out_stride_row + ids[:, None])
    tl.atomic_add(out_ptrs, grad.to(tl.float32), mask=entries, sem="relaxed")


def embedding_grad_weights(grad_y, token_ids, token_adapter, adapter_rank, vocab_size: int) -> torch.Tensor:
    """dA (L, R, vocab): dA[a(t), :r, ids[t]] += dy[t, :r]."""
    num_tokens, max_rank = grad_y.shape
    grad_w = torch.zeros(adapter_rank.shape[0], max_rank, vocab_size, dtype=torch.float32, device=grad_y.device)
    if num_tokens and max_rank:
        block_r = next_power_of_2(max_rank)
        block_t = max(1, min(64, 2048 // block_r))
        # grid: (token blocks,)
        _embedding_grad_kernel[grid_1d(1, cdiv(num_tokens, block_t))](
            grad_y, token_ids, grad_w, token_adapter, adapter_rank,
            num_tokens, vocab_size, grad_y.stride(0), grad_w.stride(0), grad_w.stride(1),
            MAX_RANK=max_rank, BLOCK_T=block_t, BLOCK_R=block_r,
        )
    return grad_w.to(grad_y.dtype)
