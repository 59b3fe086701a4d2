"""What the tests and the benchmark share: batch scenarios, the op table, references, tolerances.

One table of ops (name, input builder, call, reference) drives both the pytest suites and
``python/bench.py``, so a number in the bench is checked by the same rule as a test. The
references compute the math in any dtype: float64 for the truth, the op's own low precision for
the error torch itself makes, from which the tolerance is derived (no guessed ``atol``).

No pytest and no numpy here: this module ships with the package.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import LoRABatch, embedding_a, gate_up_expand, qkv_expand, sgmv_expand, sgmv_shrink

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fresh_generator() -> tuple[torch.Generator, int]:
    """A CPU generator with a random seed, and the seed (to print when a check fails)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


# ---- batch scenarios (per sequence: length and adapter slot) ----


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    seq_lens: tuple
    adapter_ids: tuple
    ranks: tuple  # per slot, 0 = unused

    def scalings(self) -> list[float]:
        return [0.5 + 0.25 * slot for slot in range(len(self.ranks))]


SCENARIOS = [
    # heterogeneous ranks, a rank-0 slot, no-adapter and zero-length sequences
    Scenario("mixed", (5, 0, 7, 1, 9, 3), (0, 2, -1, 1, 0, 3), (8, 4, 0, 2)),
    Scenario("one_token", (1,), (1,), (4, 8)),
    Scenario("many_adapters", (2, 1, 3, 1, 2, 1, 1, 2, 1, 3), tuple(range(10)), (1, 2, 3, 4, 5, 6, 7, 8, 2, 8)),
    Scenario("all_no_adapter", (4, 3), (-1, -1), (8, 4)),
    Scenario("empty", (0, 0), (0, 1), (8, 4)),
    # one adapter holds most tokens; its run crosses chunk boundaries (16 and 32)
    Scenario("skewed", (33, 1, 1, 2, 1), (1, 0, -1, 1, 2), (4, 8, 2)),
    Scenario("single_adapter", (17, 16), (0, 0), (8,)),
]


def make_batch(scenario: Scenario, device=DEFAULT_DEVICE, chunk_size=None) -> LoRABatch:
    return LoRABatch.build(
        scenario.seq_lens, scenario.adapter_ids, scenario.ranks, scenario.scalings(),
        device=device, chunk_size=chunk_size,
    )


# ---- references: the math of every op, dense per slot, in any compute dtype ----


def _slot_masks(batch):
    return [(batch.token_adapter == slot).unsqueeze(1) for slot in range(batch.num_slots)]


def _rank_mask(rank: int, max_rank: int, num_slices: int, device) -> torch.Tensor:
    return (torch.arange(max_rank, device=device) < rank).repeat(num_slices)


def shrink_reference(x, weights, batch, num_slices, dtype):
    """y = x @ A[a(t)].T per token, rows beyond rank zeroed, computed in ``dtype``."""
    max_rank = weights.shape[1] // num_slices
    y = torch.zeros(x.shape[0], weights.shape[1], dtype=dtype, device=x.device)
    for slot, (rank, mask) in enumerate(zip(batch.adapter_rank.tolist(), _slot_masks(batch))):
        a_slot = torch.where(_rank_mask(rank, max_rank, num_slices, x.device).unsqueeze(1), weights[slot].to(dtype), 0)
        y = torch.where(mask, x.to(dtype) @ a_slot.T, y)
    return y


def expand_reference(base, y, weights, batch, offsets, dtype):
    """base + c * y[slice i, :r] @ B[a(t), slice i, :r].T per token, computed in ``dtype``."""
    max_rank = weights.shape[2]
    out = base.to(dtype).clone()
    scalings = batch.adapter_scaling.tolist()
    for slot, (rank, mask) in enumerate(zip(batch.adapter_rank.tolist(), _slot_masks(batch))):
        keep = torch.arange(max_rank, device=y.device) < rank
        for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            y_slice = torch.where(keep, y[:, i * max_rank : (i + 1) * max_rank].to(dtype), 0)
            delta = scalings[slot] * (y_slice @ torch.where(keep, weights[slot, lo:hi].to(dtype), 0).T)
            out[:, lo:hi] = torch.where(mask, out[:, lo:hi] + delta, out[:, lo:hi])
    return out


def embedding_reference(token_ids, weights, batch, dtype):
    """y[t] = A[a(t), :r, ids[t]], zero past the rank and for tokens without adapter."""
    max_rank = weights.shape[1]
    y = torch.zeros(token_ids.shape[0], max_rank, dtype=dtype, device=weights.device)
    for slot, (rank, mask) in enumerate(zip(batch.adapter_rank.tolist(), _slot_masks(batch))):
        rows = torch.where(torch.arange(max_rank, device=weights.device) < rank, weights[slot].to(dtype)[:, token_ids].T, 0)
        y = torch.where(mask, rows, y)
    return y


# ---- the tolerance rule, derived from the data ----


def error_and_bound(out, ref64, ref_lowp) -> tuple[float, float]:
    """(out's max error against the float64 reference, the largest error allowed).

    The bound is twice the error of the same math done by torch in the low precision, plus a
    few ulps of the output's magnitude. A non-finite output (an unwritten element?) has error inf.
    """
    if out.numel() == 0:
        return 0.0, 0.0
    out64 = out.double()
    err = (out64 - ref64).abs().max().item() if torch.isfinite(out64).all() else float("inf")
    err_lowp = (ref_lowp.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    return err, 2 * err_lowp + 4 * torch.finfo(out.dtype).eps * scale


def assert_close_to_reference(out, ref64, ref_lowp, what: str, seed: int):
    """Fails when out's error against float64 exceeds the data-derived bound (error_and_bound)."""
    err, bound = error_and_bound(out, ref64, ref_lowp)
    assert err != float("inf"), f"{what}: non-finite output (unwritten element?), seed {seed}"
    assert err <= bound, (f"{what}: max error {err:.3e} > bound {bound:.3e} "
                          f"(2x torch's low-precision error + 4 ulps of the output), seed {seed}")


class RecordLoraCalls(TorchDispatchMode):
    """Records every torch.ops.lora.* call made inside the block, with the arguments it
    receives: the exact op call a Python function makes, without knowing the op's schema."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lora":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


# ---- the op table: one row per public op ----


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes small enough for Triton's interpreter on CPU; the GPU suite and bench pass real sizes."""

    in_features: int = 32
    max_rank: int = 8
    q_size: int = 24
    kv_size: int = 8
    intermediate: int = 20
    vocab: int = 50


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    build: Callable  # (batch, dims, dtype, gen) -> inputs dict
    run: Callable  # (inputs, batch, backend) -> output tensor; leaves the inputs unchanged
    reference: Callable  # (inputs, batch, compute dtype) -> output in that dtype
    # (inputs, batch, backend) -> None: the call as a model makes it, expand ops accumulating into
    # inputs["base"] in place (what the bench times; run() copies the base first).
    run_in_place: Callable


def _rand(gen, *shape, dtype, device):
    # Drawn on the generator's device: a CPU generator gives the same data on any device, a
    # CUDA one (the bench's full sizes) saves drawing gigabytes on the host.
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device=gen.device).to(device=device, dtype=dtype)


def _nan_past_rank(weights, batch, rank_dim: int, num_slices: int = 1):
    """Fills each slot's weights past its rank with NaN (padding may hold anything): a kernel
    that reads them into the math fails the finiteness check."""
    max_rank = weights.shape[rank_dim] // num_slices
    for slot, rank in enumerate(batch.adapter_rank.tolist()):
        past = (torch.arange(max_rank, device=weights.device) >= rank).repeat(num_slices)
        weights[slot].index_fill_(rank_dim - 1, past.nonzero().flatten(), float("nan"))
    return weights


def _shrink_case(num_slices):
    def build(batch, dims, dtype, gen):
        s, device = batch.num_tokens, batch.device
        return {
            "x": _rand(gen, s, dims.in_features, dtype=dtype, device=device),
            "A": _nan_past_rank(_rand(gen, batch.num_slots, num_slices * dims.max_rank, dims.in_features, dtype=dtype, device=device) / dims.in_features**0.5, batch, 1, num_slices),
        }

    def run(inputs, batch, backend):
        return sgmv_shrink(inputs["x"], inputs["A"], batch, num_slices=num_slices, backend=backend)

    def reference(inputs, batch, dtype):
        return shrink_reference(inputs["x"], inputs["A"], batch, num_slices, dtype)

    return OpCase(f"shrink_{num_slices}slice", build, run, reference, run_in_place=run)


def _expand_case(name, offsets_of, call):
    def build(batch, dims, dtype, gen):
        s, device = batch.num_tokens, batch.device
        offsets = offsets_of(dims)
        num_slices = len(offsets) - 1
        return {
            "y": _rand(gen, s, num_slices * dims.max_rank, dtype=dtype, device=device),
            "B": _nan_past_rank(_rand(gen, batch.num_slots, offsets[-1], dims.max_rank, dtype=dtype, device=device) / dims.max_rank**0.5, batch, 2),
            "base": _rand(gen, s, offsets[-1], dtype=dtype, device=device),
            "offsets": offsets,
            "dims": dims,
        }

    def run(inputs, batch, backend):
        out = inputs["base"].clone()
        call(inputs, batch, out, backend)
        return out

    def run_in_place(inputs, batch, backend):
        call(inputs, batch, inputs["base"], backend)

    def reference(inputs, batch, dtype):
        return expand_reference(inputs["base"], inputs["y"], inputs["B"], batch, inputs["offsets"], dtype)

    return OpCase(name, build, run, reference, run_in_place)


def _embedding_case():
    def build(batch, dims, dtype, gen):
        s, device = batch.num_tokens, batch.device
        return {
            "ids": torch.randint(0, dims.vocab, (s,), generator=gen, device=gen.device).to(device),
            "A": _nan_past_rank(_rand(gen, batch.num_slots, dims.max_rank, dims.vocab, dtype=dtype, device=device), batch, 1),
        }

    def run(inputs, batch, backend):
        return embedding_a(inputs["ids"], inputs["A"], batch, backend=backend)

    def reference(inputs, batch, dtype):
        return embedding_reference(inputs["ids"], inputs["A"], batch, dtype)

    return OpCase("embedding_a", build, run, reference, run_in_place=run)


OP_CASES = [
    _shrink_case(1),
    _shrink_case(2),
    _shrink_case(3),
    _expand_case(
        "sgmv_expand",
        lambda d: [0, d.q_size, d.q_size + d.kv_size, d.q_size + 3 * d.kv_size],  # unequal slices
        lambda i, b, out, be: sgmv_expand(i["y"], i["B"], b, out, i["offsets"], backend=be),
    ),
    _expand_case(
        "qkv_expand",
        lambda d: [0, d.q_size, d.q_size + d.kv_size, d.q_size + 2 * d.kv_size],
        lambda i, b, out, be: qkv_expand(i["y"], i["B"], b, out, i["dims"].q_size, i["dims"].kv_size, backend=be),
    ),
    _expand_case(
        "gate_up_expand",
        lambda d: [0, d.intermediate, 2 * d.intermediate],
        lambda i, b, out, be: gate_up_expand(i["y"], i["B"], b, out, backend=be),
    ),
    _embedding_case(),
]

OP_CASES_BY_NAME = {case.name: case for case in OP_CASES}
