"""Batch metadata, built once per forward and passed to every LoRA layer's op.

A ``LoRABatch`` holds, on the device:

- ``token_adapter (s,) int32``: adapter slot of every token, ``-1`` for none;
- ``adapter_rank (L,) int32`` and ``adapter_scaling (L,) float32`` per slot (rank 0 = unused);
- two chunk plans (the contract is in ``csrc_triton/__init__.py``):
  ``segment_plan`` for the ``triton`` backend cuts each segment — a run of consecutive tokens
  with one adapter, in token order — into chunks of ``chunk_size`` tokens;
  ``sorted_plan`` for the ``csgmv`` backend first stable-sorts the tokens by adapter, so each
  adapter's tokens form one run, then cuts the same way.

Plans are computed from ``token_adapter`` without host synchronisation: on the host when the ids
come from the host (then everything goes over in one copy), by device ops when they are on the
GPU already. Their number of chunks is a static upper bound — ``cdiv(s, chunk_size)`` plus the number of runs
(``max_segments``, or ``L + 1`` adapter groups once sorted), and never more than ``s`` since a chunk
holds at least one token — and unused chunks have length 0.

Two kinds of batch:

- *per-step* (``build``, ``from_token_adapters``): sized for its own contents, validated on the
  host; ``max_rank`` and ``auto``'s preference come from the contents.
- *fixed-capacity* (``empty``, then ``update_`` every step): sized once for at most ``max_tokens``
  tokens in ``max_seqs`` sequences, for CUDA graphs and ``torch.compile``. ``update_`` rewrites
  the tensors in place (same data pointers, no host synchronisation on the GPU path); tokens past
  the live count are padding with adapter -1. Everything a graph or a compiled function reads on
  the host — sizes, ``chunk_size``, ``max_rank`` (the bound ranks may reach), ``auto``'s
  preference (from the plans' sizes) — is fixed at allocation, so it holds for every update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHUNK_SIZES = (16, 32, 64, 128)

# What the constructors accept: host sequences or tensors (on any device).
Ints = Sequence[int] | torch.Tensor
Floats = Sequence[float] | torch.Tensor
Device = torch.device | str | None


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
    # chunks this batch's contents use (host value, for explanations); None for a fixed-capacity
    # batch, whose contents may be updated on the device
    chunks_needed: int | None

    @property
    def num_chunks(self) -> int:
        return self.chunk_adapter.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.token_order, self.chunk_adapter, self.chunk_start, self.chunk_len]

    @classmethod
    def empty(cls, num_tokens: int, num_chunks: int, chunk_size: int, device) -> ChunkPlan:
        def table():
            return torch.zeros(num_chunks, dtype=torch.int32, device=device)

        return cls(torch.arange(num_tokens, dtype=torch.int32, device=device), table(), table(), table(),
                   chunk_size, None)

    def cut_runs_(self, adapter_in_order: torch.Tensor) -> None:
        """Rewrite the chunk table, in place, as the runs of equal adapter in ``adapter_in_order``
        (the adapter at each position) cut every ``chunk_size``; device ops only."""
        device = adapter_in_order.device
        num_positions, max_chunks = adapter_in_order.shape[0], self.num_chunks
        chunk_adapter = torch.full((max_chunks,), -1, dtype=torch.int64, device=device)
        chunk_start = torch.zeros(max_chunks, dtype=torch.int64, device=device)
        chunk_len = torch.zeros(max_chunks, dtype=torch.int64, device=device)
        if num_positions > 0 and max_chunks > 0:
            position = torch.arange(num_positions, device=device)
            starts_run = torch.ones(num_positions, dtype=torch.bool, device=device)
            starts_run[1:] = adapter_in_order[1:] != adapter_in_order[:-1]
            run_start = torch.cummax(torch.where(starts_run, position, 0), dim=0).values
            starts_chunk = (position - run_start) % self.chunk_size == 0
            # Clamped: a batch over its bound (unchecked on update_'s device path) gets wrong
            # chunks for its last tokens, never a write out of bounds.
            chunk_index = (torch.cumsum(starts_chunk, dim=0) - 1).clamp_(max=max_chunks - 1)
            chunk_start.fill_(num_positions).scatter_reduce_(0, chunk_index, position, "amin")
            chunk_len.scatter_add_(0, chunk_index, torch.ones_like(position))
            chunk_adapter.scatter_reduce_(0, chunk_index, adapter_in_order.long(), "amax")
            chunk_start.masked_fill_(chunk_len == 0, 0)
        self.chunk_adapter.copy_(chunk_adapter)
        self.chunk_start.copy_(chunk_start)
        self.chunk_len.copy_(chunk_len)


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


def _checked_sequences(seq_lens, adapter_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, adapter per sequence) as CPU int64 tensors, of equal length, lengths >= 0."""
    lengths = _as_cpu_tensor(seq_lens, "seq_lens", torch.int64)
    seq_adapter = _as_cpu_tensor(adapter_ids, "adapter_ids", torch.int64)
    if lengths.shape != seq_adapter.shape:
        raise ValueError(
            f"seq_lens and adapter_ids must have one entry per sequence, got "
            f"{lengths.shape[0]} and {seq_adapter.shape[0]}"
        )
    if lengths.numel() and lengths.min() < 0:
        raise ValueError(f"seq_lens must be non-negative, got {lengths.tolist()}")
    return lengths, seq_adapter


def _check_adapter_ids(token_adapter: torch.Tensor, num_slots: int) -> None:
    if token_adapter.numel() and (token_adapter.min() < -1 or token_adapter.max() >= num_slots):
        bad = token_adapter[(token_adapter < -1) | (token_adapter >= num_slots)]
        raise ValueError(
            f"adapter ids must be -1 (no adapter) or a slot in [0, {num_slots}), got {bad.unique().tolist()}"
        )


def _checked_slots(ranks, scalings, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks int64, scalings float32) on the CPU: one entry per slot, ranks in [0, max_rank]."""
    rank = _as_cpu_tensor(ranks, "ranks", torch.int64)
    scaling = _as_cpu_tensor(scalings, "scalings", torch.float32)
    if scaling.shape[0] != rank.shape[0]:
        raise ValueError(f"scalings must have one entry per adapter slot ({rank.shape[0]}), got {scaling.shape[0]}")
    if rank.numel() and rank.min() < 0:
        raise ValueError(f"ranks must be non-negative, got {rank.tolist()}")
    if max_rank is not None and rank.numel() and rank.max() > max_rank:
        raise ValueError(f"ranks {rank.tolist()} exceed the batch's max_rank {max_rank}")
    if not torch.isfinite(scaling).all():
        raise ValueError(f"scalings must be finite, got {scaling.tolist()}")
    return rank, scaling


def _copyable(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor``, pinned when it is a host tensor bound for a GPU: a non-blocking copy from
    pageable memory may wait for the stream, and the caching host allocator keeps the pinned
    block until the copy has run."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory()
    return tensor


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without waiting for the GPU."""
    return _copyable(tensor, device).to(device, non_blocking=True)


def _packed(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """CPU int32 tensors laid end to end in one buffer, each starting at a 16-byte boundary
    (the alignment Triton specializes pointers on); returns the buffer and the start offsets."""
    offsets = [0]
    for tensor in tensors:
        offsets.append(offsets[-1] + -(-tensor.numel() // 4) * 4)
    packed = torch.zeros(offsets[-1], dtype=torch.int32)
    for tensor, start in zip(tensors, offsets):
        packed[start:start + tensor.numel()] = tensor
    return packed, offsets[:-1]


def _to_device_in_one_copy(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list]:
    """CPU int32 tensors on ``device`` by one copy: (the device buffer, the tensors as views into it)."""
    packed, offsets = _packed(tensors)
    buffer = _to_device(packed, device)
    return buffer, [buffer[start:start + tensor.numel()] for tensor, start in zip(tensors, offsets)]


def _host_metadata(ids: torch.Tensor, capacity: int, segment_chunks: int, sorted_chunks: int,
                   chunk_size: int) -> list[torch.Tensor]:
    """On the host: the token adapters ``ids`` padded with -1 to ``capacity``, then both plans'
    tensors (segment plan, sorted plan; ``ChunkPlan.tensors`` order)."""
    token_adapter = torch.full((capacity,), -1, dtype=torch.int32)
    token_adapter[:ids.shape[0]] = ids
    cpu = torch.device("cpu")
    segment_plan = ChunkPlan.empty(capacity, segment_chunks, chunk_size, cpu)
    sorted_plan = ChunkPlan.empty(capacity, sorted_chunks, chunk_size, cpu)
    _plan_into(token_adapter, segment_plan, sorted_plan)
    return [token_adapter, *segment_plan.tensors(), *sorted_plan.tensors()]


def _plan_into(token_adapter: torch.Tensor, segment_plan: ChunkPlan, sorted_plan: ChunkPlan) -> None:
    """Both chunk plans of ``token_adapter`` (on their device), in place: token order, and
    sorted by adapter."""
    segment_plan.cut_runs_(token_adapter)
    sort_order = torch.sort(token_adapter, stable=True).indices
    sorted_plan.token_order.copy_(sort_order)
    sorted_plan.cut_runs_(token_adapter[sort_order])


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}, got {chunk_size}")


def _plan_sizes(num_tokens: int, max_segments: int, num_slots: int, chunk_size: int) -> tuple[int, int]:
    """Static chunk counts of the (segment, sorted) plans: runs cut every ``chunk_size`` take at
    most ``cdiv(s, chunk_size) + runs - 1`` chunks, with at most ``max_segments + 1`` runs in
    token order (the +1: padding or no-adapter tokens after the last sequence) and ``L + 1``
    adapter groups once sorted; never more than ``s``."""
    tiles = math.ceil(num_tokens / chunk_size)
    return min(tiles + max_segments, num_tokens), min(tiles + num_slots + 1, num_tokens)


@dataclass(eq=False)
class LoRABatch:
    """Per-batch LoRA metadata: which adapter each token uses, and the backends' chunk plans.

    Build it once per forward with ``LoRABatch.build`` (per sequence) or
    ``LoRABatch.from_token_adapters`` (per token) and pass it to every LoRA op of the forward;
    or, for CUDA graphs and ``torch.compile``, allocate one with ``LoRABatch.empty`` and
    ``update_`` it before every step.
    """

    token_adapter: torch.Tensor  # (s,) int32
    adapter_rank: torch.Tensor  # (L,) int32
    adapter_scaling: torch.Tensor  # (L,) float32
    segment_plan: ChunkPlan
    sorted_plan: ChunkPlan
    max_rank: int  # no slot's rank exceeds it (the weights' R must be at least this)
    # True when auto runs csgmv (the sorted plan): sorting the tokens by adapter needs fewer
    # chunks than token order -- for this batch's contents, or for a fixed-capacity batch, at
    # its static plan sizes.
    prefers_adapter_sorting: bool
    max_seqs: int | None = None  # sequences a fixed-capacity batch holds; None: a per-step batch
    # A fixed-capacity batch's token_adapter and plan tensors are views into this one buffer,
    # so update_ from host values writes them all with one copy.
    metadata_buffer: torch.Tensor | None = None

    def __post_init__(self):
        if self.device.type == "cuda" and not torch.compiler.is_compiling():
            from csrc_triton import workspace  # torch only: no Triton import

            workspace.prepare(self.device)  # the split-K counters of graph captures, outside any graph pool

    @property
    def num_tokens(self) -> int:
        return self.token_adapter.shape[0]

    @property
    def num_slots(self) -> int:
        return self.adapter_rank.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    @property
    def is_fixed_capacity(self) -> bool:
        return self.max_seqs is not None

    def copy_(self, other: LoRABatch) -> LoRABatch:
        """Copy another per-step batch of the same sizes (token count, slots, chunk size,
        ``max_segments``) into this one's tensors, in place. Serving under CUDA graphs is simpler
        with a fixed-capacity batch and ``update_``, which takes any contents that fit."""
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
        for mine, theirs in ((self.segment_plan, other.segment_plan), (self.sorted_plan, other.sorted_plan)):
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

    def _plan_(self) -> None:
        """Both chunk plans from ``token_adapter``, in place, by device ops."""
        _plan_into(self.token_adapter, self.segment_plan, self.sorted_plan)

    @classmethod
    def build(cls, seq_lens: Ints, adapter_ids: Ints, ranks: Ints, scalings: Floats, *,
              device: Device = None, chunk_size: int | None = None) -> LoRABatch:
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
        lengths, seq_adapter = _checked_sequences(seq_lens, adapter_ids)
        token_adapter = torch.repeat_interleave(seq_adapter, lengths)
        return cls.from_token_adapters(
            token_adapter, ranks, scalings, device=device, chunk_size=chunk_size,
            max_segments=lengths.shape[0],
        )

    @classmethod
    def from_token_adapters(cls, token_adapter_ids: Ints, ranks: Ints, scalings: Floats, *,
                            device: Device = None, chunk_size: int | None = None,
                            max_segments: int | None = None) -> LoRABatch:
        """Metadata from the adapter slot of every token (``-1`` = no adapter).

        Validates on the host once (reads the ids back if they are on a GPU), builds the chunk
        plans there and moves everything to ``device`` in one copy: a few host ops instead of
        dozens of small kernel launches per batch. ``max_segments`` bounds the number of runs
        of one adapter in token order (``build`` passes the number of sequences); it sizes the
        segment plan. Default: the runs of this batch.
        """
        device = torch.device(device or _device_of(token_adapter_ids))
        token_adapter = _as_cpu_tensor(token_adapter_ids, "token_adapter_ids", torch.int64)
        rank, scaling = _checked_slots(ranks, scalings)
        num_slots = rank.shape[0]
        _check_adapter_ids(token_adapter, num_slots)
        num_tokens = token_adapter.shape[0]
        chunk_size = chunk_size or default_chunk_size(num_tokens)
        _check_chunk_size(chunk_size)

        run_lengths = torch.unique_consecutive(token_adapter, return_counts=True)[1]
        if max_segments is None:
            max_segments = run_lengths.numel()
        elif max_segments < run_lengths.numel():
            raise ValueError(
                f"max_segments ({max_segments}) is below the batch's {run_lengths.numel()} runs of one adapter"
            )
        segment_chunks, sorted_chunks = _plan_sizes(num_tokens, max_segments, num_slots, chunk_size)
        segment_needed = _num_chunks_needed(run_lengths, chunk_size)
        sorted_needed = _num_chunks_needed(torch.bincount(token_adapter + 1, minlength=num_slots + 1), chunk_size)
        token_adapter, *plans = _host_metadata(token_adapter, num_tokens, segment_chunks, sorted_chunks, chunk_size)
        # float32 scalings travel as their int32 bits, so one buffer holds everything
        tensors = [token_adapter, rank.to(torch.int32), scaling.view(torch.int32), *plans]
        _, (token_adapter, adapter_rank, scaling_bits, *plans) = _to_device_in_one_copy(tensors, device)
        batch = cls(
            token_adapter=token_adapter,
            adapter_rank=adapter_rank,
            adapter_scaling=scaling_bits.view(torch.float32),
            segment_plan=ChunkPlan(*plans[:4], chunk_size, segment_needed),
            sorted_plan=ChunkPlan(*plans[4:], chunk_size, sorted_needed),
            max_rank=int(rank.max()) if num_slots else 0,
            prefers_adapter_sorting=sorted_needed < segment_needed,
        )
        return batch

    @classmethod
    def empty(cls, max_tokens: int, ranks: Ints, scalings: Floats, *, max_seqs: int | None = None,
              max_rank: int | None = None, device: Device = None,
              chunk_size: int | None = None) -> LoRABatch:
        """A fixed-capacity batch of ``max_tokens`` tokens, all padding (no adapter) until
        ``update_`` writes a step's contents.

        Args:
            max_tokens: the token count of every forward it serves (a graph's bucket size); the
                live tokens of a step come first, the rest is padding.
            ranks, scalings: ``(L,)`` per slot, as in ``build``. Tensors on ``device`` are kept,
                not copied, so their owner (an ``AdapterPool``) can change them in place.
            max_seqs: the most sequences a step may have (default ``max_tokens``: any
                per-token ids fit); it sizes the segment plan.
            max_rank: the most any slot's rank may become (default: the largest of ``ranks``);
                the weights' R must be at least this.
            device: default: the device of ``ranks`` if a tensor, else the CPU.
            chunk_size: tokens per chunk; default ``default_chunk_size(max_tokens)``.
        """
        device = torch.device(device or _device_of(ranks))
        rank, scaling = _checked_slots(ranks, scalings)
        num_slots = rank.shape[0]
        max_seqs = max_tokens if max_seqs is None else max_seqs
        max_rank = (int(rank.max()) if num_slots else 0) if max_rank is None else max_rank
        if min(max_tokens, max_seqs, max_rank) < 0:
            raise ValueError(f"max_tokens, max_seqs and max_rank must be non-negative, "
                             f"got {max_tokens}, {max_seqs}, {max_rank}")
        if num_slots and rank.max() > max_rank:
            raise ValueError(f"ranks {rank.tolist()} exceed max_rank {max_rank}")
        chunk_size = chunk_size or default_chunk_size(max_tokens)
        _check_chunk_size(chunk_size)

        def shared(values, as_cpu, dtype):  # a tensor on the device is kept; anything else copied there
            if isinstance(values, torch.Tensor) and values.device == device and values.dtype == dtype:
                return values
            return as_cpu.to(device=device, dtype=dtype)

        segment_chunks, sorted_chunks = _plan_sizes(max_tokens, max_seqs, num_slots, chunk_size)
        no_tokens = torch.empty(0, dtype=torch.int32)
        buffer, (token_adapter, *plans) = _to_device_in_one_copy(
            _host_metadata(no_tokens, max_tokens, segment_chunks, sorted_chunks, chunk_size), device)
        return cls(
            token_adapter=token_adapter,
            adapter_rank=shared(ranks, rank, torch.int32),
            adapter_scaling=shared(scalings, scaling, torch.float32),
            segment_plan=ChunkPlan(*plans[:4], chunk_size, None),
            sorted_plan=ChunkPlan(*plans[4:], chunk_size, None),
            max_rank=max_rank,
            prefers_adapter_sorting=sorted_chunks < segment_chunks,
            max_seqs=max_seqs,
            metadata_buffer=buffer,
        )

    def update_(self, seq_lens: Ints | None = None, adapter_ids: Ints | None = None, *,
                token_adapter: torch.Tensor | None = None, ranks: Ints | None = None,
                scalings: Floats | None = None) -> LoRABatch:
        """Write a step's contents into this fixed-capacity batch, in place (same tensors).

        Give either the step's sequences -- ``seq_lens`` and ``adapter_ids`` per sequence, on
        the host, checked against the capacity -- or ``token_adapter``, the ``(n,)`` adapter
        slot of each of the first ``n <= max_tokens`` tokens, possibly already on the GPU.
        Tokens past the live ones are padding (adapter -1). ``ranks`` / ``scalings`` (host
        values, one per slot) replace the slots' in place; ranks may not exceed ``max_rank``.

        On the GPU nothing here waits for the device. Host ids: the plans are computed on the
        host and the token ids and both plans go over in one asynchronous copy. Ids on the GPU:
        the plans are computed by device ops, and ``token_adapter`` is not checked (that would
        synchronise). Either way an id outside ``[-1, L)`` counts as -1, and the ids must hold
        at most ``max_seqs`` runs of one adapter in token order (true when each of at most
        ``max_seqs`` sequences has one adapter; ``max_seqs = max_tokens`` allows any ids).
        """
        if not self.is_fixed_capacity:
            raise ValueError("update_ needs a fixed-capacity batch (LoRABatch.empty or AdapterPool.empty_batch)")
        # everything is checked before anything is written: a refused update leaves the batch
        slot_values = None if ranks is None and scalings is None else self._checked_slot_values(ranks, scalings)
        ids = None
        if token_adapter is not None:
            if seq_lens is not None or adapter_ids is not None:
                raise ValueError("update_: give seq_lens and adapter_ids, or token_adapter, not both")
            if not isinstance(token_adapter, torch.Tensor) or token_adapter.dim() != 1:
                raise ValueError("update_: token_adapter must be a 1-D tensor of adapter slots")
            if token_adapter.shape[0] > self.num_tokens:
                raise self._capacity_error(f"{token_adapter.shape[0]} tokens")
            ids = token_adapter
        elif seq_lens is not None or adapter_ids is not None:
            ids = self._token_ids_of_sequences(seq_lens, adapter_ids)
        if slot_values is not None:
            self.adapter_rank.copy_(_to_device(slot_values[0], self.device))
            self.adapter_scaling.copy_(_to_device(slot_values[1], self.device))
        if ids is not None:
            ids = torch.where((ids >= -1) & (ids < self.num_slots), ids, -1)
            if ids.device.type == "cpu" and self.metadata_buffer is not None:
                # the plans built here; the token ids and both plans written by one copy
                packed, _ = _packed(_host_metadata(ids, self.num_tokens, self.segment_plan.num_chunks,
                                                   self.sorted_plan.num_chunks, self.segment_plan.chunk_size))
                self.metadata_buffer.copy_(_copyable(packed, self.device), non_blocking=True)
            else:
                ids = _to_device(ids, self.device)
                self.token_adapter[:ids.shape[0]].copy_(ids)
                self.token_adapter[ids.shape[0]:].fill_(-1)
                self._plan_()
        return self

    def _capacity_error(self, what: str) -> ValueError:
        return ValueError(f"update_: {what} exceeds the batch's capacity of {self.num_tokens} tokens "
                          f"in {self.max_seqs} sequences: use a larger batch (bucket)")

    def _token_ids_of_sequences(self, seq_lens, adapter_ids) -> torch.Tensor:
        lengths, seq_adapter = _checked_sequences(seq_lens if seq_lens is not None else [],
                                                  adapter_ids if adapter_ids is not None else [])
        num_live = int(lengths.sum())
        if lengths.shape[0] > self.max_seqs or num_live > self.num_tokens:
            raise self._capacity_error(f"{lengths.shape[0]} sequences of {num_live} tokens")
        _check_adapter_ids(seq_adapter, self.num_slots)
        return torch.repeat_interleave(seq_adapter, lengths).to(torch.int32)

    def _checked_slot_values(self, ranks, scalings) -> tuple[torch.Tensor, torch.Tensor]:
        if ranks is None or scalings is None:
            raise ValueError("update_: give ranks and scalings together")
        rank, scaling = _checked_slots(ranks, scalings, self.max_rank)
        if rank.shape[0] != self.num_slots:
            raise ValueError(f"update_: expected {self.num_slots} ranks (one per slot), got {rank.shape[0]}")
        return rank.to(torch.int32), scaling
