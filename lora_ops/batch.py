"""Batch metadata, built once per forward and passed to every LoRA layer's op.

A ``LoRABatch`` holds, on the device:

- ``token_adapter (s,) int32``: adapter slot of every token, ``-1`` for none;
- ``adapter_rank (L,) int32`` and ``adapter_scaling (L,) float32`` per slot (rank 0 = unused);
- two chunk plans (the contract is in ``csrc_triton/__init__.py``):
  ``segment_plan`` for the ``triton`` backend cuts each segment — a run of consecutive tokens
  with one adapter, in token order — into chunks of ``chunk_size`` tokens;
  ``sorted_plan`` for the ``csgmv`` backend first stable-sorts the tokens by adapter, so each
  adapter's tokens form one run, then cuts the same way.

Plans are computed from ``token_adapter`` with device ops only (no host synchronisation); their
number of chunks is a static upper bound — ``cdiv(s, chunk_size)`` plus the number of runs
(``max_segments``, or ``L + 1`` adapter groups once sorted), and never more than ``s`` since a chunk
holds at least one token — and unused chunks have length 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def default_chunk_size(num_tokens: int) -> int:
    """Tokens per chunk (the M tile of every matmul kernel), from the batch's token count."""
    if num_tokens <= 64:
        return 16
    if num_tokens <= 256:
        return 32
    return 64  # measured on an H200: 128-token chunks were no faster on prefill


@dataclass(eq=False)
class ChunkPlan:
    """Chunks of at most ``chunk_size`` positions; position p holds token ``token_order[p]``."""

    token_order: torch.Tensor  # (s,) int32
    chunk_adapter: torch.Tensor  # (C,) int32, -1 = tokens without adapter or unused chunk
    chunk_start: torch.Tensor  # (C,) int32
    chunk_len: torch.Tensor  # (C,) int32, 0 = unused chunk
    chunk_size: int
    chunks_needed: int  # chunks this batch's contents use (host value, for explanations)

    @property
    def num_chunks(self) -> int:
        return self.chunk_adapter.shape[0]


def _cut_runs_into_chunks(
    adapter_in_order: torch.Tensor, chunk_size: int, max_chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk table of the runs of equal adapter in ``adapter_in_order``; device ops only."""
    device = adapter_in_order.device
    num_positions = adapter_in_order.shape[0]
    chunk_adapter = torch.full((max_chunks,), -1, dtype=torch.int64, device=device)
    chunk_start = torch.zeros(max_chunks, dtype=torch.int64, device=device)
    chunk_len = torch.zeros(max_chunks, dtype=torch.int64, device=device)
    if num_positions > 0:
        position = torch.arange(num_positions, device=device)
        starts_run = torch.ones(num_positions, dtype=torch.bool, device=device)
        starts_run[1:] = adapter_in_order[1:] != adapter_in_order[:-1]
        run_start = torch.cummax(torch.where(starts_run, position, 0), dim=0).values
        starts_chunk = (position - run_start) % chunk_size == 0
        chunk_index = torch.cumsum(starts_chunk, dim=0) - 1
        chunk_start.fill_(num_positions).scatter_reduce_(0, chunk_index, position, "amin")
        chunk_len.scatter_add_(0, chunk_index, torch.ones_like(position))
        chunk_adapter.scatter_reduce_(0, chunk_index, adapter_in_order, "amax")
        chunk_start.masked_fill_(chunk_len == 0, 0)
    return (
        chunk_adapter.to(torch.int32),
        chunk_start.to(torch.int32),
        chunk_len.to(torch.int32),
    )


def _device_of(*values) -> torch.device:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _num_chunks_needed(run_lengths: torch.Tensor, chunk_size: int) -> int:
    return int(((run_lengths + chunk_size - 1) // chunk_size).sum())


def _as_cpu_tensor(values, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    integral = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
    if tensor.numel() and not dtype.is_floating_point and not integral:
        raise ValueError(f"{name} must hold integers, got {tensor.dtype}")
    return tensor.to(dtype)


@dataclass(eq=False)
class LoRABatch:
    """Per-batch LoRA metadata: which adapter each token uses, and the backends' chunk plans.

    Build it once per forward with ``LoRABatch.build`` (per sequence) or
    ``LoRABatch.from_token_adapters`` (per token) and pass it to every LoRA op of the forward.
    """

    token_adapter: torch.Tensor  # (s,) int32
    adapter_rank: torch.Tensor  # (L,) int32
    adapter_scaling: torch.Tensor  # (L,) float32
    segment_plan: ChunkPlan
    sorted_plan: ChunkPlan
    max_rank: int
    # True when sorting tokens by adapter needs fewer chunks than token order (auto -> csgmv).
    prefers_adapter_sorting: bool

    @property
    def num_tokens(self) -> int:
        return self.token_adapter.shape[0]

    @property
    def num_slots(self) -> int:
        return self.adapter_rank.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    def copy_(self, other: LoRABatch) -> LoRABatch:
        """Copy another batch's metadata into this one's tensors, in place.

        For CUDA graphs: capture with one batch, then before each replay copy the next batch
        (same token count, slots, chunk size and ``max_segments``) into the captured one.
        """
        pairs = [(self.token_adapter, other.token_adapter), (self.adapter_rank, other.adapter_rank),
                 (self.adapter_scaling, other.adapter_scaling)]
        for mine, theirs in ((self.segment_plan, other.segment_plan), (self.sorted_plan, other.sorted_plan)):
            if mine.chunk_size != theirs.chunk_size:
                raise ValueError(f"copy_: chunk_size differs ({mine.chunk_size} vs {theirs.chunk_size})")
            pairs += [(mine.token_order, theirs.token_order), (mine.chunk_adapter, theirs.chunk_adapter),
                      (mine.chunk_start, theirs.chunk_start), (mine.chunk_len, theirs.chunk_len)]
        for mine, theirs in pairs:
            if mine.shape != theirs.shape:
                raise ValueError(f"copy_: metadata shapes differ ({tuple(mine.shape)} vs {tuple(theirs.shape)}): "
                                 "batches need equal token counts, slots and max_segments")
        for mine, theirs in pairs:
            mine.copy_(theirs)
            mine.chunks_needed = theirs.chunks_needed
        self.max_rank = other.max_rank
        self.prefers_adapter_sorting = other.prefers_adapter_sorting
        return self

    @property
    def chunk_size(self) -> int:
        return self.segment_plan.chunk_size

    def plan(self, name: str) -> ChunkPlan:
        """The ``"segment"`` plan (token order, the ``triton`` backend) or the ``"sorted"`` plan
        (tokens sorted by adapter, ``csgmv``); ``lora_ops.explain`` says which one runs."""
        if name == "segment":
            return self.segment_plan
        if name == "sorted":
            return self.sorted_plan
        raise ValueError(f"plan must be 'segment' or 'sorted', got {name!r}")

    def op_metadata(self, plan: str | None) -> tuple:
        """The metadata tensors of a ``torch.ops.lora`` call, in schema order: token_adapter,
        token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank. ``plan`` None (the
        torch_native backend, which reads only token_adapter and adapter_rank) passes the
        segment plan's."""
        chunks = self.segment_plan if plan is None else self.plan(plan)
        return (self.token_adapter, chunks.token_order, chunks.chunk_adapter, chunks.chunk_start,
                chunks.chunk_len, self.adapter_rank)

    @classmethod
    def build(
        cls,
        seq_lens: Sequence[int] | torch.Tensor,
        adapter_ids: Sequence[int] | torch.Tensor,
        ranks: Sequence[int] | torch.Tensor,
        scalings: Sequence[float] | torch.Tensor,
        *,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
    ) -> LoRABatch:
        """Metadata for sequences laid out one after another in the token dimension.

        Args:
            seq_lens: ``(num_seqs,)`` token count of each sequence (0 allowed).
            adapter_ids: ``(num_seqs,)`` adapter slot of each sequence, ``-1`` for no adapter.
            ranks: ``(L,)`` rank of each adapter slot, 0 for an unused slot.
            scalings: ``(L,)`` scaling of each slot (PEFT: ``lora_alpha / r``).
            device: where the metadata lives (the device of the activations); default: the
                device of ``seq_lens`` or ``adapter_ids`` if either is a tensor, else the CPU.
            chunk_size: tokens per chunk; default ``default_chunk_size(total tokens)``.
        """
        device = device or _device_of(seq_lens, adapter_ids)
        lengths = _as_cpu_tensor(seq_lens, "seq_lens", torch.int64)
        seq_adapter = _as_cpu_tensor(adapter_ids, "adapter_ids", torch.int64)
        if lengths.shape != seq_adapter.shape:
            raise ValueError(
                f"seq_lens and adapter_ids must have one entry per sequence, got "
                f"{lengths.shape[0]} and {seq_adapter.shape[0]}"
            )
        if lengths.numel() and lengths.min() < 0:
            raise ValueError(f"seq_lens must be non-negative, got {lengths.tolist()}")
        token_adapter = torch.repeat_interleave(seq_adapter, lengths)
        return cls.from_token_adapters(
            token_adapter, ranks, scalings, device=device, chunk_size=chunk_size,
            max_segments=lengths.shape[0],
        )

    @classmethod
    def from_token_adapters(
        cls,
        token_adapter_ids: Sequence[int] | torch.Tensor,
        ranks: Sequence[int] | torch.Tensor,
        scalings: Sequence[float] | torch.Tensor,
        *,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        max_segments: int | None = None,
    ) -> LoRABatch:
        """Metadata from the adapter slot of every token (``-1`` = no adapter).

        Validates on the host once (reads the ids back if they are on a GPU), then builds the
        chunk plans on ``device`` with device ops only. ``max_segments`` bounds the number of
        runs of one adapter in token order (``build`` passes the number of sequences); it sizes
        the segment plan, so batches with equal token counts and bounds have equal shapes and
        can be copied into each other's buffers (``copy_``). Default: the runs of this batch.
        """
        device = torch.device(device or _device_of(token_adapter_ids))
        token_adapter = _as_cpu_tensor(token_adapter_ids, "token_adapter_ids", torch.int64)
        rank = _as_cpu_tensor(ranks, "ranks", torch.int64)
        scaling = _as_cpu_tensor(scalings, "scalings", torch.float32)
        num_slots = rank.shape[0]
        if scaling.shape[0] != num_slots:
            raise ValueError(
                f"scalings must have one entry per adapter slot ({num_slots}), got {scaling.shape[0]}"
            )
        if num_slots and rank.min() < 0:
            raise ValueError(f"ranks must be non-negative, got {rank.tolist()}")
        if not torch.isfinite(scaling).all():
            raise ValueError(f"scalings must be finite, got {scaling.tolist()}")
        if token_adapter.numel() and (token_adapter.min() < -1 or token_adapter.max() >= num_slots):
            bad = token_adapter[(token_adapter < -1) | (token_adapter >= num_slots)]
            raise ValueError(
                f"adapter ids must be -1 (no adapter) or a slot in [0, {num_slots}), "
                f"got {bad.unique().tolist()}"
            )
        num_tokens = token_adapter.shape[0]
        if chunk_size is None:
            chunk_size = default_chunk_size(num_tokens)
        if chunk_size not in (16, 32, 64, 128):
            raise ValueError(f"chunk_size must be one of 16, 32, 64, 128, got {chunk_size}")

        run_lengths = torch.unique_consecutive(token_adapter, return_counts=True)[1]
        if max_segments is None:
            max_segments = run_lengths.numel()
        elif max_segments < run_lengths.numel():
            raise ValueError(
                f"max_segments ({max_segments}) is below the batch's {run_lengths.numel()} runs of one adapter"
            )
        adapter_counts = torch.bincount(token_adapter + 1, minlength=num_slots + 1)
        num_segment_chunks = _num_chunks_needed(run_lengths, chunk_size)
        num_sorted_chunks = _num_chunks_needed(adapter_counts, chunk_size)

        token_adapter = token_adapter.to(device)
        tiles = math.ceil(num_tokens / chunk_size)
        positions = torch.arange(num_tokens, dtype=torch.int32, device=device)
        segment_plan = ChunkPlan(
            positions,
            *_cut_runs_into_chunks(token_adapter, chunk_size, min(tiles + max_segments, num_tokens)),
            chunk_size,
            num_segment_chunks,
        )
        sort_order = torch.sort(token_adapter, stable=True).indices
        sorted_plan = ChunkPlan(
            sort_order.to(torch.int32),
            *_cut_runs_into_chunks(token_adapter[sort_order], chunk_size, min(tiles + num_slots + 1, num_tokens)),
            chunk_size,
            num_sorted_chunks,
        )
        return cls(
            token_adapter=token_adapter.to(torch.int32),
            adapter_rank=rank.to(device=device, dtype=torch.int32),
            adapter_scaling=scaling.to(device),
            segment_plan=segment_plan,
            sorted_plan=sorted_plan,
            max_rank=int(rank.max()) if num_slots else 0,
            prefers_adapter_sorting=num_sorted_chunks < num_segment_chunks,
        )
