"""How the benchmark times a call: CUDA-graph replays for device time, a host clock for the
eager cost a user without graphs pays per call.

Graph replays do not flush L2, so cases whose bytes fit in L2 (decode) can beat the DRAM
roofline; the anchors were measured the same way.
"""

import statistics
import time

import torch

import lora_ops

CALLS_PER_GRAPH = 20  # op calls captured back to back in one timed graph


def first_line(exc):
    """An exception as one short line for a table cell."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:120]


def graph_safe(backend):
    """Whether to try a CUDA-graph capture: not for backends that declare host syncs."""
    info = getattr(lora_ops, "BACKEND_INFO", {}).get(backend)
    return getattr(info, "cuda_graph_safe", True)


def time_op(fn, device, allow_graph=True, target_us=2000.0):
    """Median microseconds per call of fn, and how it ran: 'graph', 'eager (why)' or 'cpu'.

    On a GPU: warm up on a side stream (compiles Triton kernels), capture CALLS_PER_GRAPH calls
    in one CUDA graph, then time batches of replays between CUDA event pairs and take the median;
    a capture failure falls back to eager calls timed the same way. On a CPU: perf_counter.
    """
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples), "cpu"

    warm_up_on_side_stream(fn, 3)
    torch.cuda.synchronize()

    run, mode, graph = fn, "eager (backend declares it is not graph-capturable)", None
    calls_per_run = 1
    if allow_graph:
        try:
            # Many calls in one graph, as in a model's step graph: one call per graph would time
            # the graph launch (~5 us) instead of the op.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(CALLS_PER_GRAPH):
                    fn()
            run, mode, calls_per_run = graph.replay, "graph", CALLS_PER_GRAPH
        except Exception as e:  # data-dependent host syncs cannot be captured
            graph = None
            mode = f"eager (capture failed: {first_line(e)})"
            torch.cuda.synchronize()

    us = median_event_us(run, calls_per_run, target_us)
    del graph
    return us, mode


def warm_up_on_side_stream(fn, calls):
    """Calls fn `calls` times on a side stream joined back to the current one: the warm-up a
    CUDA-graph capture needs (Triton compiles, cuBLAS picks its kernels) off the capture stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def median_event_us(run, calls_per_run=1, target_us=2000.0):
    """Median microseconds per call of `run()` (which makes `calls_per_run` calls; warmed up by
    the caller): batches of back-to-back runs of about `target_us` between a pair of CUDA
    events, 15 batches (5 when one run takes over 1 ms)."""

    def elapsed_us(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (runs * calls_per_run)

    estimate = elapsed_us(1) * calls_per_run
    runs = int(max(1, min(20, target_us // max(estimate, 1e-3))))
    repeats = 15 if estimate < 1000 else 5
    return statistics.median(elapsed_us(runs) for _ in range(repeats))


def host_us_per_call(fn, device, calls, warmup=20):
    """Wall time per call of `calls` back-to-back eager calls, synchronised once at the end:
    what a caller without CUDA graphs pays, host work and launches included."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e6 / calls


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
