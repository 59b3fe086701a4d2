"""Shared test machinery: batch scenarios, the op table, references and data-derived tolerances.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
any kernel module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402

import lora_ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device machine)")


def kernel_backends() -> list[str]:
    """The Triton backends, when they can run here (GPU, or the interpreter on CPU)."""
    return ["triton", "csgmv"] if HAS_TRITON else []


@pytest.fixture(params=["chunk", "per_token"])
def matmul_kernels(request, monkeypatch):
    """Runs a test once per kernel family of the Triton backends' shrink and expand: the chunk
    kernels over the plan, and the per-token kernels that the size rule picks for small
    decode batches (forced here whatever the size)."""
    force_matmul_kernels(monkeypatch, per_token=request.param == "per_token")
    return request.param


def force_matmul_kernels(monkeypatch, per_token: bool) -> None:
    if HAS_TRITON:
        import csrc_triton.expand
        import csrc_triton.shrink

        for module in (csrc_triton.shrink, csrc_triton.expand):
            monkeypatch.setattr(module, "_use_per_token", lambda *sizes: per_token)


def backends_for(dtype: torch.dtype, device: str = DEVICE) -> list[str]:
    # bfloat16 tl.dot is wrong in Triton's CPU interpreter: kernels get bf16 only on the GPU.
    if device == "cpu" and dtype == torch.bfloat16:
        return ["torch_native"]
    return ["torch_native", *kernel_backends()]


def fresh_generator() -> tuple[torch.Generator, int]:
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


def make_batch(scenario: Scenario, device=DEVICE, chunk_size=None) -> lora_ops.LoRABatch:
    return lora_ops.LoRABatch.build(
        scenario.seq_lens, scenario.adapter_ids, scenario.ranks, scenario.scalings(),
        device=device, chunk_size=chunk_size,
    )


# ---- references: DESIGN.md's math, dense per slot, in any compute dtype ----


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
    max_rank = weights.shape[1]
    y = torch.zeros(token_ids.shape[0], max_rank, dtype=dtype, device=weights.device)
    for slot, (rank, mask) in enumerate(zip(batch.adapter_rank.tolist(), _slot_masks(batch))):
        rows = torch.where(torch.arange(max_rank, device=weights.device) < rank, weights[slot].to(dtype)[:, token_ids].T, 0)
        y = torch.where(mask, rows, y)
    return y


def assert_close_to_reference(out, ref64, ref_lowp, what: str, seed: int):
    """The data-derived tolerance: out's error against float64 is at most twice that of the
    same math done by torch in the low precision, plus a few ulps of the output's magnitude."""
    out64 = out.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (unwritten element?), seed {seed}"
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    err_lowp = (ref_lowp.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    bound = 2 * err_lowp + 4 * torch.finfo(out.dtype).eps * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (torch low-precision error {err_lowp:.3e}), seed {seed}"


# ---- the op table: one row per public op ----


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes small enough for Triton's interpreter on CPU; the GPU suite passes real sizes."""

    in_features: int = 32
    max_rank: int = 8
    q_size: int = 24
    kv_size: int = 8
    intermediate: int = 20
    vocab: int = 50


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    build: object  # (batch, dims, dtype, gen) -> inputs dict
    run: object  # (inputs, batch, backend) -> output tensor
    reference: object  # (inputs, batch, compute dtype) -> output in that dtype


def _rand(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


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
        return lora_ops.sgmv_shrink(inputs["x"], inputs["A"], batch, num_slices=num_slices, backend=backend)

    def reference(inputs, batch, dtype):
        return shrink_reference(inputs["x"], inputs["A"], batch, num_slices, dtype)

    return OpCase(f"shrink_{num_slices}slice", build, run, reference)


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

    def reference(inputs, batch, dtype):
        return expand_reference(inputs["base"], inputs["y"], inputs["B"], batch, inputs["offsets"], dtype)

    return OpCase(name, build, run, reference)


def _embedding_case():
    def build(batch, dims, dtype, gen):
        s, device = batch.num_tokens, batch.device
        return {
            "ids": torch.randint(0, dims.vocab, (s,), generator=gen).to(device),
            "A": _nan_past_rank(_rand(gen, batch.num_slots, dims.max_rank, dims.vocab, dtype=dtype, device=device), batch, 1),
        }

    def run(inputs, batch, backend):
        return lora_ops.embedding_a(inputs["ids"], inputs["A"], batch, backend=backend)

    def reference(inputs, batch, dtype):
        return embedding_reference(inputs["ids"], inputs["A"], batch, dtype)

    return OpCase("embedding_a", build, run, reference)


OP_CASES = [
    _shrink_case(1),
    _shrink_case(2),
    _shrink_case(3),
    _expand_case(
        "sgmv_expand",
        lambda d: [0, d.q_size, d.q_size + d.kv_size, d.q_size + 3 * d.kv_size],  # unequal slices
        lambda i, b, out, be: lora_ops.sgmv_expand(i["y"], i["B"], b, out, i["offsets"], backend=be),
    ),
    _expand_case(
        "qkv_expand",
        lambda d: [0, d.q_size, d.q_size + d.kv_size, d.q_size + 2 * d.kv_size],
        lambda i, b, out, be: lora_ops.qkv_expand(i["y"], i["B"], b, out, i["dims"].q_size, i["dims"].kv_size, backend=be),
    ),
    _expand_case(
        "gate_up_expand",
        lambda d: [0, d.intermediate, 2 * d.intermediate],
        lambda i, b, out, be: lora_ops.gate_up_expand(i["y"], i["B"], b, out, backend=be),
    ),
    _embedding_case(),
]
