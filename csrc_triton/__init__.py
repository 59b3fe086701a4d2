"""Triton kernels of lora_ops: plain functions, tensors in, kernel launches, tensors out.

Every matmul kernel here walks a *chunk plan* built once per batch by ``lora_ops.LoRABatch``:

- ``chunk_adapter (C,) int32``: adapter slot of chunk ``c``; ``-1`` means the chunk's tokens have
  no adapter (shrink writes zeros for them, expand leaves them untouched).
- ``chunk_start (C,) int32`` and ``chunk_len (C,) int32``: chunk ``c`` covers positions
  ``[chunk_start[c], chunk_start[c] + chunk_len[c])`` with ``chunk_len[c] <= chunk_size``.
  Unused chunks (the plan is sized by a static upper bound) have ``chunk_len == 0`` and exit
  at once.
- ``token_order (s,) int32``: position -> token row. With ``permuted=False`` (the ``triton``
  backend, segments in token order) positions are token rows and ``token_order`` is not read;
  with ``permuted=True`` (the ``csgmv`` backend, tokens sorted by adapter) row =
  ``token_order[position]``.
- ``adapter_rank (L,) int32`` and ``adapter_scaling (L,) float32`` per adapter slot.

Every token lies in exactly one chunk. The grid comes from tensor sizes only (``C`` and the weight
shapes), never from data values, so a CUDA graph replays correctly with new batch contents.
Grids are one-dimensional (``common.grid_1d``): CUDA caps axes y and z at 65535 programs.

Shrink and expand also have a *per-token* kernel (one program per output tile and token, reading
``token_adapter (s,) int32`` instead of the plan). Which kernel runs is decided by the caller
(``lora_ops.dispatch``); each module's ``launch_chunk`` / ``launch_per_token`` just launches.
The only state kept between calls is the split-K shrink's arrival counters (``workspace.py``).
"""
