"""Training benchmark: forward + backward of one LoRA'd Llama-3-8B projection, 8 adapters in one batch.

For qkv (4096 -> 4096 + 2*1024, 3 slices) and gate-up (4096 -> 2*14336, 2 slices), ranks 16 and
64, 8192 tokens spread uniformly over 8 adapters or 90 % on one, it times (CUDA events, the step
captured in CUDA graphs where it can be; ``timing.time_op``):

- ``ours``: ``sgmv_shrink`` + the fused expand (out of place) per backend, then backward;
- ``loop``: (a) a per-adapter loop in plain torch: each adapter's tokens gathered (indices
  precomputed), ``F.linear`` through its A and each slice's B, added back;
- ``dense``: (b) one LoRA of the same total tokens, ``base + c * F.linear(F.linear(x, A), B)``
  (B block-diagonal over the slices: one GEMM), the practical floor.

Every step computes the gradients of x, the base output, A and B (upstream gradient given). The
base projection itself is not timed: the output it would give is an input that requires grad.
Targets (issue 11): ours >= 3x faster than the loop, within 1.3x of dense.

    PYTHONPATH=. python python/bench_training.py            # on the GPU
    PYTHONPATH=. python python/bench_training.py --smoke    # tiny float32 shapes on the CPU
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import lora_ops  # noqa: E402
from timing import time_op  # noqa: E402

NUM_ADAPTERS, NUM_TOKENS, SEQ_LEN = 8, 8192, 512
PROJECTIONS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336))}
SMOKE_PROJECTIONS = {"qkv": (64, (64, 16, 16)), "gate_up": (64, (96, 96))}


def token_adapters(num_tokens: int, seq_len: int, skewed: bool) -> torch.Tensor:
    """Adapter of every token: sequences of seq_len round-robin over the adapters, or 90 % of
    the sequences on adapter 0 and the rest round-robin over the others."""
    num_seqs = num_tokens // seq_len
    if skewed:
        big = num_seqs * 9 // 10
        seq_adapter = [0] * big + [1 + i % (NUM_ADAPTERS - 1) for i in range(num_seqs - big)]
    else:
        seq_adapter = [i % NUM_ADAPTERS for i in range(num_seqs)]
    return torch.tensor(seq_adapter).repeat_interleave(seq_len)


class Problem:
    """The tensors of one case: inputs that require grad, the upstream gradient, the batch."""

    def __init__(self, in_features, widths, rank, skewed, num_tokens, seq_len, device, dtype):
        gen = torch.Generator(device=device).manual_seed(0)
        out_features, n = sum(widths), len(widths)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

        self.widths, self.rank = widths, rank
        self.scalings = [2.0] * NUM_ADAPTERS
        adapters = token_adapters(num_tokens, seq_len, skewed)
        self.batch = lora_ops.LoRABatch.from_token_adapters(adapters, [rank] * NUM_ADAPTERS, self.scalings,
                                                            device=device)
        self.rows = [(adapters == a).nonzero().squeeze(1).to(device) for a in range(NUM_ADAPTERS)]
        self.x = rand(num_tokens, in_features).requires_grad_()
        self.base = rand(num_tokens, out_features).requires_grad_()
        self.A = rand(NUM_ADAPTERS, n * rank, in_features, scale=in_features**-0.5).requires_grad_()
        self.B = rand(NUM_ADAPTERS, out_features, rank, scale=rank**-0.5).requires_grad_()
        self.grad = rand(num_tokens, out_features)
        # dense: one adapter's A (n*r, in) and block-diagonal B (out, n*r)
        self.dense_A = rand(n * rank, in_features, scale=in_features**-0.5).requires_grad_()
        block_diagonal = torch.zeros(out_features, n * rank, device=device, dtype=dtype)
        offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
        for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            block_diagonal[lo:hi, i * rank : (i + 1) * rank] = rand(hi - lo, rank, scale=rank**-0.5)
        self.dense_B = block_diagonal.requires_grad_()
        self.offsets = offsets

    def ours(self, backend):
        y = lora_ops.sgmv_shrink(self.x, self.A, self.batch, len(self.widths), backend=backend)
        if len(self.widths) == 3:
            return lora_ops.qkv_expand(y, self.B, self.batch, self.base, self.widths[0], self.widths[1],
                                       backend=backend, in_place=False)
        return lora_ops.gate_up_expand(y, self.B, self.batch, self.base, backend=backend, in_place=False)

    def loop(self):
        out, r = self.base, self.rank
        for adapter, rows in enumerate(self.rows):
            x_rows = self.x[rows]
            deltas = [F.linear(F.linear(x_rows, self.A[adapter, i * r : (i + 1) * r]), self.B[adapter, lo:hi])
                      for i, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:]))]
            out = out.index_add(0, rows, torch.cat(deltas, dim=1), alpha=self.scalings[adapter])
        return out

    def dense(self):
        return self.base + self.scalings[0] * F.linear(F.linear(self.x, self.dense_A), self.dense_B)

    def step(self, forward):
        def run():
            forward().backward(self.grad)
        return run

    def grads_of(self, forward):
        for tensor in (self.x, self.base, self.A, self.B):
            tensor.grad = None
        forward().backward(self.grad)
        return [tensor.grad.double() for tensor in (self.x, self.base, self.A, self.B)]  # copies: timing adds to .grad


def max_relative_difference(grads, expected) -> float:
    return max(((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for g, e in zip(grads, expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU (Triton interpreted)")
    parser.add_argument("--backends", nargs="+", default=["triton", "csgmv"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, projections, num_tokens, seq_len = torch.device("cpu"), torch.float32, SMOKE_PROJECTIONS, 48, 8
        args.ranks = [8]
    else:
        device, dtype, projections, num_tokens, seq_len = torch.device("cuda"), torch.bfloat16, PROJECTIONS, NUM_TOKENS, SEQ_LEN
        print(f"device: {torch.cuda.get_device_name()}, bfloat16, {num_tokens} tokens, {NUM_ADAPTERS} adapters")

    header = ["projection", "rank", "tokens", "backend", "ours us", "loop us", "dense us", "loop/ours",
              "ours/dense", "grad diff vs loop", "timed as"]
    rows = []
    for name, (in_features, widths) in projections.items():
        for rank in args.ranks:
            for skewed in (False, True):
                problem = Problem(in_features, widths, rank, skewed, num_tokens, seq_len, device, dtype)
                loop_us, loop_mode = time_op(problem.step(problem.loop), device)
                dense_us, _ = time_op(problem.step(problem.dense), device)
                expected = problem.grads_of(problem.loop)
                for backend in args.backends:
                    ours_us, mode = time_op(problem.step(lambda: problem.ours(backend)), device)
                    difference = max_relative_difference(problem.grads_of(lambda: problem.ours(backend)), expected)
                    rows.append([name, rank, "skewed 90%" if skewed else "uniform", backend, f"{ours_us:.0f}",
                                 f"{loop_us:.0f}", f"{dense_us:.0f}", f"{loop_us / ours_us:.2f}x",
                                 f"{ours_us / dense_us:.2f}x", f"{difference:.1e}", f"{mode}; loop {loop_mode}"])
                    print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


if __name__ == "__main__":
    main()
