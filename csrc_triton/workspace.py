"""Split-K arrival counters: the only state the kernels keep between calls.

The split-K shrink reduces its partial sums in the same launch: the last of a tile's K splits
to arrive (counted with an atomic on the tile's int32 counter) sums the partials and resets the
counter to 0. Counters must therefore be zero before a call and never be used by two launches
at the same time.

- Eager calls get fresh ``torch.zeros`` counters (one memset launch; nothing kept, so no state
  between calls or streams, and nothing left alive in a graph memory pool -- torch.compile's
  cudagraph trees run warm-up calls eagerly inside their pool and refuse a graph whose pool
  holds tensors that are not its outputs).
- Calls during CUDA-graph capture take a slice of a zeroed per-device arena that no other call,
  stream or graph ever uses again, so graphs can replay concurrently with each other and with
  eager calls, without a memset node (0.6-0.9 us per call in a graph, measured on an H200).
  ``prepare`` allocates the arena; ``LoRABatch`` calls it when built on a GPU, outside any graph
  or compiled region. Without an arena, or when it is spent, the counters are a ``torch.zeros``
  captured into the graph (correct, one memset node slower). Slices are not reclaimed: CUDA
  graphs hold raw pointers, and the arena (kept for the process) must outlive them.
"""

import torch

_ARENA_COUNTERS = 1 << 20  # 4 MB per device: a few hundred counters per captured shrink call

_arenas: dict = {}  # device -> [zeroed int32 buffer, next free index]


def _zeros(count: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.int32, device=device)


def prepare(device: torch.device) -> None:
    """Allocates ``device``'s capture arena if it has none; call it outside graph capture."""
    if device not in _arenas:
        _arenas[device] = [_zeros(_ARENA_COUNTERS, device), 0]


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed counters that no other launch uses."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    arena = _arenas.get(device) if capturing else None
    if arena is None or arena[1] + count > arena[0].numel():
        return _zeros(count, device)
    start = arena[1]
    arena[1] += count
    return arena[0][start:start + count]
