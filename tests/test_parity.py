"""Every op x backend x dtype against an independent float64 reference, on fresh random data.

Outputs the ops allocate are poisoned: with deterministic mode on, torch.empty fills new
float tensors with NaN, so an element a kernel forgets to write fails the finiteness check.
"""

import dataclasses

import pytest
import torch

import lora_ops
from conftest import (
    DEVICE, OP_CASES, SCENARIOS, Dims, Scenario, assert_close_to_reference, backends_for, force_matmul_kernels, fresh_generator,
    make_batch, requires_cuda, expand_reference, shrink_reference,
)

CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def poisoned_empty():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def check_op(op_case, scenario, dtype, backend, dims=Dims(), device=DEVICE, chunk_size=None):
    gen, seed = fresh_generator()
    batch = make_batch(scenario, device=device, chunk_size=chunk_size)
    inputs = op_case.build(batch, dims, dtype, gen)
    out = op_case.run(inputs, batch, backend)
    what = f"{op_case.name}/{scenario.name}/{backend}/{dtype}"
    assert out.dtype == dtype and out.device.type == torch.device(device).type, what
    assert_close_to_reference(out, op_case.reference(inputs, batch, torch.float64),
                              op_case.reference(inputs, batch, dtype), what, seed)
    if "base" in inputs:  # tokens without LoRA keep their base output bit for bit
        untouched = batch.token_adapter == -1
        assert torch.equal(out[untouched], inputs["base"][untouched]), what


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_op_matches_reference(op_case, scenario, dtype, poisoned_empty, matmul_kernels):
    for backend in backends_for(dtype):
        check_op(op_case, scenario, dtype, backend)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])  # 64: the prefill-sized chunk
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_chunk_boundaries(op_case, chunk_size, poisoned_empty, monkeypatch):
    """Runs of exactly, one below and one above the chunk size, in one batch (chunk kernels)."""
    force_matmul_kernels(monkeypatch, per_token=False)
    lens = (chunk_size, chunk_size - 1, chunk_size + 1, 1)
    scenario = Scenario(f"around_{chunk_size}", lens, (0, 1, 0, 2), (8, 3, 5))
    for backend in backends_for(torch.float32):
        check_op(op_case, scenario, torch.float32, backend, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_layer_matches_peft_formula(scenario, dtype, poisoned_empty):
    """shrink then expand equals PEFT's per-token base + scaling * (x @ A.T) @ B.T."""
    dims = Dims()
    for backend in backends_for(dtype):
        gen, seed = fresh_generator()
        batch = make_batch(scenario)
        n = 3
        offsets = [0, dims.q_size, dims.q_size + dims.kv_size, dims.q_size + 2 * dims.kv_size]
        x = torch.randn(batch.num_tokens, dims.in_features, generator=gen).to(DEVICE, dtype)
        A = (torch.randn(batch.num_slots, n * dims.max_rank, dims.in_features, generator=gen) / dims.in_features**0.5).to(DEVICE, dtype)
        B = (torch.randn(batch.num_slots, offsets[-1], dims.max_rank, generator=gen) / dims.max_rank**0.5).to(DEVICE, dtype)
        base = torch.randn(batch.num_tokens, offsets[-1], generator=gen).to(DEVICE, dtype)

        out = base.clone()
        y = lora_ops.sgmv_shrink(x, A, batch, num_slices=n, backend=backend)
        lora_ops.qkv_expand(y, B, batch, out, dims.q_size, dims.kv_size, backend=backend)

        def layer(compute_dtype):
            return expand_reference(base, shrink_reference(x, A, batch, n, compute_dtype), B, batch, offsets, compute_dtype)

        assert_close_to_reference(out, layer(torch.float64), layer(dtype), f"layer/{scenario.name}/{backend}", seed)


REAL = Dims(in_features=4096, max_rank=64, q_size=4096, kv_size=1024, intermediate=14336, vocab=32000)


@requires_cuda
@pytest.mark.parametrize("max_rank", [64, 128])
@pytest.mark.parametrize("num_tokens", [1, 256, 2048, 4096])
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_gpu_bf16_real_sizes(op_case, num_tokens, max_rank, poisoned_empty, matmul_kernels):
    """bfloat16 at Llama-3-8B sizes with heterogeneous ranks (the maximum beside 8 and 16) on the
    GPU; each max rank has tiles of its own."""
    gen = torch.Generator().manual_seed(num_tokens)
    num_seqs = min(num_tokens, 16)
    lens = torch.full((num_seqs,), num_tokens // num_seqs)
    lens[: num_tokens % num_seqs] += 1
    adapters = torch.randint(-1, 8, (num_seqs,), generator=gen)
    ranks = (max_rank, 8, 16, 0, max_rank, max_rank // 2, 64, 8)
    scenario = Scenario("real", tuple(lens.tolist()), tuple(adapters.tolist()), ranks)
    dims = dataclasses.replace(REAL, max_rank=max_rank)
    for backend in ("triton", "csgmv"):
        check_op(op_case, scenario, torch.bfloat16, backend, dims=dims, device="cuda")
