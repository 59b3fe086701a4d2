"""LoRABatch: the chunk plans cover every token exactly once, with one adapter per chunk."""

import pytest
import torch

import lora_ops
from conftest import SCENARIOS, make_batch, requires_cuda


def expected_runs(adapter_in_order, chunk_size):
    """(adapter, start, length) of every chunk: runs of equal adapter cut every chunk_size."""
    chunks, start = [], 0
    values = adapter_in_order.tolist()
    for position in range(1, len(values) + 1):
        if position == len(values) or values[position] != values[start]:
            for offset in range(start, position, chunk_size):
                chunks.append((values[start], offset, min(chunk_size, position - offset)))
            start = position
    return chunks


def used_chunks(plan):
    keep = plan.chunk_len > 0
    return list(zip(plan.chunk_adapter[keep].tolist(), plan.chunk_start[keep].tolist(), plan.chunk_len[keep].tolist()))


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_plans_match_a_direct_cut_of_the_runs(scenario, chunk_size):
    batch = make_batch(scenario, chunk_size=chunk_size)
    token_adapter = torch.repeat_interleave(torch.tensor(scenario.adapter_ids), torch.tensor(scenario.seq_lens))
    assert batch.token_adapter.tolist() == token_adapter.tolist()

    segment = batch.segment_plan
    assert segment.token_order.tolist() == list(range(batch.num_tokens))
    assert used_chunks(segment) == expected_runs(token_adapter, chunk_size)

    sorted_plan = batch.sorted_plan
    order = sorted_plan.token_order.long().cpu()
    assert sorted(order.tolist()) == list(range(batch.num_tokens))
    assert token_adapter[order].tolist() == sorted(token_adapter.tolist())
    assert used_chunks(sorted_plan) == expected_runs(token_adapter[order], chunk_size)
    # padding chunks are empty and adapter-less; the static sizes bound the chunk count
    for plan in (segment, sorted_plan):
        padding = plan.chunk_len == 0
        assert (plan.chunk_adapter[padding] == -1).all()
    tiles = -(-batch.num_tokens // chunk_size)
    assert sorted_plan.num_chunks == min(tiles + batch.num_slots + 1, batch.num_tokens)


def test_sorted_plan_is_stable():
    batch = lora_ops.LoRABatch.from_token_adapters([1, 0, 1, 0, -1, 1], [4, 4], [1.0, 1.0])
    assert batch.sorted_plan.token_order.tolist() == [4, 1, 3, 0, 2, 5]


def test_per_token_form_equals_per_sequence_form():
    by_sequence = lora_ops.LoRABatch.build([2, 0, 3], [1, 0, -1], [4, 2], [0.5, 2.0])
    by_token = lora_ops.LoRABatch.from_token_adapters([1, 1, -1, -1, -1], [4, 2], [0.5, 2.0])
    for plan_a, plan_b in [(by_sequence.segment_plan, by_token.segment_plan), (by_sequence.sorted_plan, by_token.sorted_plan)]:
        assert used_chunks(plan_a) == used_chunks(plan_b)
    assert by_sequence.adapter_scaling.tolist() == [0.5, 2.0] and by_sequence.max_rank == 4


def test_default_chunk_size_rule():
    assert [lora_ops.default_chunk_size(s) for s in (1, 64, 65, 256, 257, 1024, 1025, 8192)] == [16, 16, 32, 32, 64, 64, 64, 64]


def test_plan_names_are_checked():
    batch = lora_ops.LoRABatch.build([2], [0], [4], [1.0])
    assert batch.plan("segment") is batch.segment_plan and batch.plan("sorted") is batch.sorted_plan
    for wrong in ("auto", "triton", "segmnet"):
        with pytest.raises(ValueError, match=rf"plan must be 'segment' or 'sorted', got '{wrong}'"):
            batch.plan(wrong)


@requires_cuda
def test_metadata_follows_the_device_of_tensor_arguments():
    lens, ids = torch.tensor([2, 1], device="cuda"), torch.tensor([0, -1], device="cuda")
    assert lora_ops.LoRABatch.build(lens, ids, [4], [1.0]).device == lens.device
    assert lora_ops.LoRABatch.build([2, 1], ids, [4], [1.0]).device == lens.device
    assert lora_ops.LoRABatch.from_token_adapters(ids, [4], [1.0]).device == lens.device
    assert lora_ops.LoRABatch.build([2, 1], [0, -1], [4], [1.0]).device.type == "cpu"
