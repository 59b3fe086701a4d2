"""LoRA A of an embedding layer: a per-token gather of one column of the adapter's A."""

import torch
import triton
import triton.language as tl

from .common import CachedLaunch, cdiv, grid_1d, next_power_of_2, slot_rank


@triton.jit
def token_block_entries(token_ids_ptr, token_adapter_ptr, adapter_rank_ptr, num_tokens, vocab_size,
                        MAX_RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's BLOCK_T tokens and the (token, rank row) entries of A they touch: rows
    below the token's adapter rank, for tokens with an adapter and an id inside the vocabulary
    (ids outside it touch nothing; the Python layer reports them). Shared with the backward."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    ids = tl.load(token_ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    adapter = tl.load(token_adapter_ptr + tokens, mask=token_mask, other=-1)
    rank = slot_rank(adapter_rank_ptr, adapter, MAX_RANK)
    valid = token_mask & (adapter >= 0) & (ids >= 0) & (ids < vocab_size)
    offs_r = tl.arange(0, BLOCK_R)
    entries = valid[:, None] & (offs_r[None, :] < rank[:, None])
    return tokens, token_mask, ids, adapter, offs_r, entries


@CachedLaunch
@triton.jit
def _embedding_a_kernel(
    token_ids_ptr, weight_ptr, out_ptr, token_adapter_ptr, adapter_rank_ptr,
    num_tokens, vocab_size, w_stride_adapter, w_stride_row, w_stride_vocab, out_stride_row,
    MAX_RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tokens, token_mask, ids, adapter, offs_r, entries = token_block_entries(
        token_ids_ptr, token_adapter_ptr, adapter_rank_ptr, num_tokens, vocab_size,
        MAX_RANK, BLOCK_T, BLOCK_R)
    w_ptrs = (weight_ptr + adapter.to(tl.int64)[:, None] * w_stride_adapter
              + offs_r[None, :].to(tl.int64) * w_stride_row + ids[:, None] * w_stride_vocab)
    values = tl.load(w_ptrs, mask=entries, other=0.0)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * out_stride_row + offs_r[None, :]
    tl.store(out_ptrs, values, mask=token_mask[:, None] & (offs_r[None, :] < MAX_RANK))


def launch(token_ids, weights, token_adapter, adapter_rank) -> torch.Tensor:
    """y (s, R): y[t, j] = A[a(t), j, ids[t]] for j < rank, else 0; zero rows for a(t) == -1."""
    num_tokens = token_ids.shape[0]
    _, max_rank, vocab_size = weights.shape
    out = weights.new_empty((num_tokens, max_rank))
    if num_tokens == 0 or max_rank == 0:
        return out
    block_r = next_power_of_2(max_rank)
    block_t = max(1, min(64, 2048 // block_r))  # about 2048 gathered elements per program
    # grid: (token blocks,)
    _embedding_a_kernel[grid_1d(1, cdiv(num_tokens, block_t))](
        token_ids, weights, out, token_adapter, adapter_rank,
        num_tokens, vocab_size, *weights.stride(), out.stride(0),
        MAX_RANK=max_rank, BLOCK_T=block_t, BLOCK_R=block_r,
    )
    return out
