"""Pieces every kernel shares: program ids, chunk rows, the clamped rank, the dot, the grid,
the dependent launch, the cached launch."""

import functools
import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

# CUDA caps grid axes y and z at 65535 programs; axis x allows 2**31 - 1. Every grid here is
# one-dimensional, so tokens, segments and chunks can number in the millions.
MAX_PROGRAMS = 2**31 - 1


# Programmatic dependent launch (Hopper and newer): a kernel launched with it may be scheduled
# while the kernel before it on the stream drains, and waits for that kernel's results (and so for
# everything before it) before its first load. This hides the gap between back-to-back small
# kernels (H100: decode-sized ops 10-21 % faster back to back); in the decode-step graph, where the
# expand follows cuBLAS's GEMM and a stream join, it measured no gain. LORA_OPS_PDL=0 turns it off.
PDL_ENABLED = os.environ.get("LORA_OPS_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def dependent_launch(tensor: torch.Tensor) -> bool:
    """Whether kernels writing ``tensor`` launch as programmatic dependents (``launch_pdl``)."""
    return PDL_ENABLED and tensor.is_cuda and _has_pdl(tensor.device.index)


@triton.jit
def wait_for_previous_kernel(DEPENDENT_LAUNCH: tl.constexpr):
    """First statement of a kernel launched with ``launch_pdl``: nothing may be read before it."""
    if DEPENDENT_LAUNCH:
        tl.extra.cuda.gdc_wait()


@triton.jit
def tile_and_row_block(NUM_TILES: tl.constexpr):
    """(tile, row block) of this program in a 1-D grid where the tile varies fastest, so the
    programs of one chunk or token run together and share its rows in L2."""
    pid = tl.program_id(0)
    return pid % NUM_TILES, pid // NUM_TILES


@triton.jit
def chunk_rows(token_order_ptr, start, offs_m, row_mask, PERMUTED: tl.constexpr):
    """Token rows (int64) of a chunk's positions ``start + offs_m``: the positions themselves in
    token order, ``token_order[position]`` in the adapter-sorted plan."""
    positions = start + offs_m
    if PERMUTED:
        rows = tl.load(token_order_ptr + positions, mask=row_mask, other=0)
    else:
        rows = positions
    return rows.to(tl.int64)


@triton.jit
def slot_rank(adapter_rank_ptr, adapter, MAX_RANK: tl.constexpr):
    """Rank of adapter slot ``adapter`` (0 for -1, no adapter), clamped to the weights' max rank
    so that a rank above R never reads the next slice."""
    rank = tl.load(adapter_rank_ptr + adapter, mask=adapter >= 0, other=0)
    return tl.minimum(rank, MAX_RANK)


@triton.jit
def dot(a, b, IEEE_DOT: tl.constexpr):
    """tl.dot; float32 inputs use IEEE products (TF32 would miss the float32 tolerances)."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


def ieee_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


# Host-side sizes of every launch. (triton.cdiv and triton.next_power_of_2 are JIT functions:
# from the host each call costs about 3 us, several per launch.)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def grid_1d(num_tiles: int, num_row_blocks: int) -> tuple[int]:
    """The 1-D grid of ``num_tiles`` x ``num_row_blocks`` programs (see tile_and_row_block)."""
    programs = num_tiles * num_row_blocks
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{num_tiles} tiles x {num_row_blocks} chunks or tokens exceed the "
                         f"{MAX_PROGRAMS} programs one launch can have")
    return (programs,)


def _specialization_key(args: tuple) -> tuple | None:
    """What Triton specializes the runtime arguments on, or None when a pointer is not 16-byte
    aligned or an argument is neither a tensor nor an int (rare; then ``JITFunction.run``
    decides). Per integer: 1, a multiple of 16, outside int32 (an i64 parameter); per tensor: its
    dtype."""
    key = []
    pointers = 0
    for value in args:
        if type(value) is int:
            key.append(2 if value == 1 else (value & 15 == 0) + 4 * ((value + 2**31) >> 32 != 0))
        elif isinstance(value, torch.Tensor):
            key.append(value.dtype)
            pointers |= value.data_ptr()
        else:
            return None
    return None if pointers & 15 else tuple(key)


def _has_launch_hook(hook) -> bool:
    """Whether a launch hook is set: a function, or (Triton >= 3.5) a non-empty HookChain."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _run_has_more_to_do(kernel) -> bool:
    """Whether ``JITFunction.run`` has per-call work besides the launch: launch hooks
    (profilers), the kernel's pre-run hooks, a debug or instrumented build, or a pipeline-stages
    hook, any of which a user may switch on at any time."""
    runtime = knobs.runtime
    return bool(_has_launch_hook(runtime.launch_enter_hook) or _has_launch_hook(runtime.launch_exit_hook)
                or kernel.pre_run_hooks or runtime.debug or knobs.compilation.instrumentation_mode
                or getattr(runtime, "add_stages_inspection_hook", None) is not None)


class CachedLaunch:
    """A kernel decorator (over ``@triton.jit``): ``kernel[grid](*args, **kwargs)`` launches
    through the compiled kernel's own C launcher.

    Triton's ``JITFunction.run`` binds every argument, builds its cache key as a string and looks
    up the device and stream on every launch: about 13.6 us of host time on the H100 machine,
    where the compiled kernel's launcher alone takes 4 (a whole ``x @ W.T`` takes 14). Here the
    key is the device, the keyword arguments (constexprs and launch options) and
    ``_specialization_key`` of the positional ones, which together fix Triton's specialization,
    so a hit launches the kernel ``JITFunction.run`` would. A miss goes through
    ``JITFunction.run`` (it compiles, or loads from Triton's caches, and launches) and keeps the
    compiled kernel. Positional arguments are the kernel's leading runtime parameters (tensors
    and ints), keyword arguments its constexprs and launch options. The interpreter (CPU), and
    whatever gives ``JITFunction.run`` more to do (``_run_has_more_to_do``: hooks, debug or
    instrumented builds), always take ``JITFunction.run``.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled_by_triton = isinstance(kernel, JITFunction)  # not the interpreter
        self.compiled = {}  # key -> (compiled kernel, constexpr values after the positional ones)

    def __getitem__(self, grid: tuple[int]):
        return functools.partial(self.launch, grid)

    def launch(self, grid: tuple[int], *args, **kwargs) -> None:
        args_key = _specialization_key(args) if self.compiled_by_triton else None
        if args_key is None or _run_has_more_to_do(self.kernel):
            self.kernel[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        key = (device, args_key, *kwargs.items())
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            self.compiled[key] = compiled, self._constexpr_tail(len(args), kwargs)
            return
        compiled, tail = entry
        compiled.run(grid[0], 1, 1, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)

    def _constexpr_tail(self, num_positional: int, kwargs: dict) -> tuple:
        """Values of the parameters after the positional ones, in signature order (the C
        launcher takes every parameter and skips the constexprs)."""
        tail = []
        for param in self.kernel.params[num_positional:]:
            if not param.is_constexpr:
                raise TypeError(f"{self.kernel.fn.__name__}: runtime parameter {param.name} must be "
                                "passed positionally to a CachedLaunch")
            tail.append(kwargs[param.name] if param.name in kwargs else param.default)
        return tuple(tail)
