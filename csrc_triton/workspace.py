"""Split-K arrival counters: the only state the kernels keep between calls.

The split-K shrink reduces its partial sums in the same launch: the last of a tile's K splits
to arrive (counted with an atomic on the tile's int32 counter) sums the partials and resets the
counter to 0. Counters must therefore be zero before a call and never be used by two launches
at the same time. A fresh ``torch.zeros`` per call would be correct but costs 0.6-0.9 us more
per call inside a CUDA graph (an extra memset node, measured on an H200), so:

- Eager calls use one buffer per CUDA stream. Calls on one stream run in order, so they never
  overlap; calls on two streams use two buffers. A buffer that is too small is replaced (the old
  one is freed in stream order: no graph ever points at these buffers).
- Calls during CUDA-graph capture take a slice of a zeroed arena that no other call, stream or
  graph ever uses again, so graphs can replay concurrently with each other and with eager calls.
  When the arena is spent, the counters are a ``torch.zeros`` captured into the graph (correct,
  one memset node slower). Slices are not reclaimed: CUDA graphs hold raw pointers, and the
  arena (kept for the process) must outlive every graph that uses it.
"""

import torch

_ARENA_COUNTERS = 1 << 20  # 4 MB per device: a few hundred counters per captured shrink call
_MIN_STREAM_COUNTERS = 1 << 12

_stream_counters: dict = {}  # (device, stream handle) -> zeroed int32 buffer
_arenas: dict = {}  # device -> [zeroed int32 buffer, next free index]


def _zeros(count: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.int32, device=device)


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed counters that no concurrently running launch uses."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        arena = _arenas.get(device)
        if arena is None or arena[1] + count > arena[0].numel():
            return _zeros(count, device)
        start = arena[1]
        arena[1] += count
        return arena[0][start:start + count]
    if device.type == "cuda" and device not in _arenas:  # ready before any capture begins
        _arenas[device] = [_zeros(_ARENA_COUNTERS, device), 0]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    buffer = _stream_counters.get((device, stream))
    if buffer is None or buffer.numel() < count:
        buffer = _zeros(max(count, _MIN_STREAM_COUNTERS), device)
        _stream_counters[(device, stream)] = buffer
    return buffer
