"""The roofline model the benchmark reports against, and the two machine rates it needs.

Byte model (the one the anchors' numbers use): x read once, the active adapters' weights once
(rank-r rows or columns only, only adapters that have tokens), the intermediate y once (written
by shrink, read by expand), the base output read and written once (expand only, tokens with an
adapter).
Roofline time = max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in the
same run as the kernels; the copy-only roofline (bytes / copy bandwidth) is what the anchors use.
"""

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Work:
    """Minimum bytes moved and flops done by one LoRA op on one batch."""

    bytes: int
    flops: int


def shrink_work(tokens, active_adapters, rank, in_features, num_slices, elem_bytes):
    """y (tokens, n*r) = x (tokens, in) @ A[a(t)] (n*r, in).T for the tokens that have an adapter."""
    x_bytes = tokens * in_features * elem_bytes
    weight_bytes = active_adapters * num_slices * rank * in_features * elem_bytes
    y_bytes = tokens * num_slices * rank * elem_bytes
    flops = 2 * tokens * rank * in_features * num_slices
    return Work(x_bytes + weight_bytes + y_bytes, flops)


def expand_work(tokens, active_adapters, rank, out_width, num_slices, elem_bytes):
    """out (tokens, W) += y (tokens, n*r) @ B[a(t)] (W, r).T, slice by slice."""
    y_bytes = tokens * num_slices * rank * elem_bytes
    weight_bytes = active_adapters * out_width * rank * elem_bytes
    out_bytes = 2 * tokens * out_width * elem_bytes  # base output read and written
    flops = 2 * tokens * rank * out_width
    return Work(y_bytes + weight_bytes + out_bytes, flops)


def roofline_us(work, copy_bytes_per_s, matmul_flops_per_s):
    """(roofline time, copy-only roofline time) in microseconds."""
    copy_us = work.bytes / copy_bytes_per_s * 1e6
    return max(copy_us, work.flops / matmul_flops_per_s * 1e6), copy_us


def _median_seconds(fn, device, warmup, repeats):
    """Median wall time of fn() over repeats, with CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_copy_bandwidth(device, num_bytes=1 << 30, repeats=10):
    """Device-to-device copy rate in bytes/s, counting bytes read + written."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    del src, dst
    return 2 * num_bytes / seconds


def measure_matmul_rate(device, n=8192, dtype=torch.bfloat16, repeats=10):
    """Dense n^3 matmul rate in flop/s on random data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(a, b, out=out), device, warmup=3, repeats=repeats)
    del a, b, out
    return 2 * n**3 / seconds
