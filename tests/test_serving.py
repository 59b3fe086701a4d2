"""Serving with fixed-capacity batches on CPU: padding tokens get no LoRA on every backend, and
an adapter pool's batch follows its loads through the layers. (Replays under CUDA graphs and
compiled models: test_cuda_graphs.py, test_compile.py.)"""

import pytest
import torch

import lora_ops
from conftest import DEVICE, OP_CASES, Dims, backends_for, fresh_generator, force_matmul_kernels
from test_layers import ToyBlock, patch_toy, toy_adapters

DIMS = Dims(in_features=16, max_rank=4, q_size=8, kv_size=4, intermediate=8, vocab=20)
RANKS, SCALINGS = [4, 2, 3], [0.5, 1.0, 2.0]
SEQ_LENS, ADAPTERS = [3, 1, 2], [2, -1, 0]  # 6 live tokens of a 10-token capacity
CASES = [case for case in OP_CASES if case.name in ("shrink_3slice", "qkv_expand", "embedding_a")]


@pytest.mark.parametrize("per_token", [False, True], ids=["chunk", "per_token"])
@pytest.mark.parametrize("op_case", CASES, ids=lambda c: c.name)
def test_padding_gets_no_lora_and_live_tokens_match_a_batch_of_their_own(op_case, per_token, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token)
    gen, _ = fresh_generator()
    padded = lora_ops.LoRABatch.empty(10, RANKS, SCALINGS, max_seqs=4, device=DEVICE).update_(SEQ_LENS, ADAPTERS)
    live = lora_ops.LoRABatch.build(SEQ_LENS, ADAPTERS, RANKS, SCALINGS, device=DEVICE)
    inputs = op_case.build(padded, DIMS, torch.float32, gen)
    live_inputs = {name: value[:6] if isinstance(value, torch.Tensor) and name not in ("A", "B") else value
                   for name, value in inputs.items()}
    for backend in backends_for(torch.float32):
        out = op_case.run(inputs, padded, backend)
        torch.testing.assert_close(out[:6], op_case.run(live_inputs, live, backend))
        padding = inputs["base"][6:] if "base" in inputs else torch.zeros_like(out[6:])
        assert torch.equal(out[6:], padding), backend


def toy_with_two_adapters():
    """The toy block of test_layers and two adapters for it, "r4" and "r2" (their ranks)."""
    torch.manual_seed(0)
    block = ToyBlock().eval()
    adapters = toy_adapters(block, {"r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                                    "r2": dict(r=2, lora_alpha=2, target_modules=["k_proj", "up_proj", "embed"])})
    return block, adapters


def test_pool_batch_follows_loads_and_matches_per_step_batches():
    block, adapters = toy_with_two_adapters()
    ours, pool = patch_toy(block, {"r4": adapters["r4"]})
    batch = pool.empty_batch(8, max_seqs=3)
    rank_tensor = batch.adapter_rank
    token_ids = torch.randint(0, 40, (1, 8))

    def check(names, seq_lens):
        with torch.no_grad():
            with pool.adapters(batch.update_(seq_lens, pool.slots(names))):
                out = ours(token_ids)
            live = sum(seq_lens)
            with pool.adapters(names, seq_lens=seq_lens):
                expected = ours(token_ids[:, :live])
            torch.testing.assert_close(out[:, :live], expected)
            torch.testing.assert_close(out[:, live:], block(token_ids)[:, live:])  # padding: the base model

    check(["r4", None], [3, 2])
    assert batch.adapter_rank.tolist() == [4, 0, 0] and batch.max_rank == 8
    pool.load("r2", *reversed(adapters["r2"]))  # written into the batch's rank tensor in place
    assert batch.adapter_rank is rank_tensor and batch.adapter_rank.tolist() == [4, 2, 0]
    check(["r2", "r4", "r2"], [1, 4, 3])
    pool.evict("r4")
    assert batch.adapter_rank.tolist() == [0, 2, 0]
    check([None, "r2"], [2, 2])
