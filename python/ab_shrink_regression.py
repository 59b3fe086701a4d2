"""Shrink kernels before the foundation rework (ef8f621) against today's, in one process.

The before/after bench of that rework (bench_results/h200_before_after.md) found 13 shrink rows
3-10 % slower, from two processes run one after the other. This times both versions' per-token
and chunk shrink kernels alternately in CUDA graphs in one process (three graphs each), then the
host cost of their launches, to tell a real regression from run-to-run drift.

    git archive ef8f621 csrc_triton | tar -x -C /tmp/before
    PYTHONPATH=. python python/ab_shrink_regression.py /tmp/before
"""
import importlib.util
import statistics
import sys

import torch

import csrc_triton.shrink as new
import lora_ops
from timing import host_us_per_call, time_op

_spec = importlib.util.spec_from_file_location("old_shrink", f"{sys.argv[1]}/csrc_triton/shrink.py")
old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(old)
dev, bf = "cuda", torch.bfloat16


def graph_us(fn):
    return time_op(fn, torch.device(dev))[0]


def host_us(fn):
    return host_us_per_call(fn, torch.device(dev), 300)


def case(tokens, slices, rank, seq=1, adapters=8):
    ids = [i % adapters for i in range(tokens // seq)]
    b = lora_ops.LoRABatch.build([seq] * (tokens // seq), ids, [rank] * adapters, [2.0] * adapters, device=dev)
    x = torch.randn(tokens, 4096, device=dev, dtype=bf)
    A = torch.randn(adapters, slices * rank, 4096, device=dev, dtype=bf) / 64
    return b, x, A

rows = []
for name, tokens, slices, rank, seq in [("decode_1 qkv r16", 1, 3, 16, 1), ("decode_1 gate_up r64", 1, 2, 64, 1),
                                        ("decode_32 gate_up r64", 32, 2, 64, 1), ("decode_32 qkv r16", 32, 3, 16, 1)]:
    b, x, A = case(tokens, slices, rank, seq)
    out = torch.empty(tokens, slices * rank, device=dev, dtype=bf)
    o = lambda: old._launch_per_token(x, A, out, b.token_adapter, b.adapter_rank, rank)
    n = lambda: new.launch_per_token(x, A, b.token_adapter, b.adapter_rank, slices)
    t = [(graph_us(o), graph_us(n)) for _ in range(3)]
    rows.append((name + " per-token", [r[0] for r in t], [r[1] for r in t]))
for name, tokens, slices, rank, seq in [("prefill 8192 qkv r64", 8192, 3, 64, 2048), ("decode_256 qkv r16 sorted", 256, 3, 16, 1),
                                        ("prefill 2048 gate_up r16", 2048, 2, 16, 64)]:
    b, x, A = case(tokens, slices, rank, seq, adapters=4 if seq > 1 else 8)
    p = b.sorted_plan
    old._use_per_token = lambda *a: False
    o = lambda: old.sgmv_shrink(x, A, b.token_adapter, p.token_order, p.chunk_adapter, p.chunk_start, p.chunk_len, b.adapter_rank, slices, p.chunk_size, True)
    n = lambda: new.launch_chunk(x, A, p.token_order, p.chunk_adapter, p.chunk_start, p.chunk_len, b.adapter_rank, slices, p.chunk_size, True)
    t = [(graph_us(o), graph_us(n)) for _ in range(3)]
    rows.append((name + " chunk", [r[0] for r in t], [r[1] for r in t]))
print(f"{'case':36s} old us (3 graphs)        new us (3 graphs)        new/old")
for name, o, n in rows:
    print(f"{name:36s} {' '.join(f'{v:6.2f}' for v in o)}   {' '.join(f'{v:6.2f}' for v in n)}   {statistics.median(n)/statistics.median(o):.3f}")
b, x, A = case(1, 3, 16)
W = torch.randn(4096, 4096, device=dev, dtype=bf)
out = torch.empty(1, 48, device=dev, dtype=bf)
print("host us/call: matmul %.1f | old launch_per_token %.1f | new launch_per_token %.1f | new kernel[grid] alone %.1f" % (
    host_us(lambda: x @ W.T),
    host_us(lambda: old._launch_per_token(x, A, out, b.token_adapter, b.adapter_rank, 16)),
    host_us(lambda: new.launch_per_token(x, A, b.token_adapter, b.adapter_rank, 3)),
    host_us(lambda: new._shrink_per_token_kernel[(24,)](x, A, out, b.token_adapter, b.adapter_rank, x.stride(0), A.stride(0), A.stride(1), out.stride(0),
        IN_FEATURES=4096, N_TOTAL=48, MAX_RANK=16, NUM_N_TILES=24, BLOCK_N=2, BLOCK_K=2048, num_warps=4))))
