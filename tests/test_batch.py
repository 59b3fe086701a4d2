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


# ---- fixed-capacity batches: LoRABatch.empty + update_ ----

RANKS, SCALINGS = [8, 4, 0, 2], [0.5, 1.0, 1.5, 2.0]


def metadata_pointers(batch):
    return [tensor.data_ptr() for plan in ("segment", "sorted") for tensor in batch.op_metadata(plan)] + [
        batch.adapter_scaling.data_ptr()]


def check_plans(batch, token_adapter):
    """Both plans are the runs of ``token_adapter`` (live tokens, then -1 padding) cut by chunk."""
    assert batch.token_adapter.tolist() == token_adapter
    ids = torch.tensor(token_adapter)
    assert used_chunks(batch.segment_plan) == expected_runs(ids, batch.chunk_size)
    order = batch.sorted_plan.token_order.long()
    assert ids[order].tolist() == sorted(token_adapter)
    assert used_chunks(batch.sorted_plan) == expected_runs(ids[order], batch.chunk_size)


def test_update_writes_in_place_from_sequences_or_token_ids():
    batch = lora_ops.LoRABatch.empty(40, RANKS, SCALINGS, max_seqs=4, chunk_size=16)
    assert batch.token_adapter.tolist() == [-1] * 40 and batch.max_rank == 8
    pointers = metadata_pointers(batch)
    # the worst case for the segment plan's bound: 4 sequences, each ending 1 past a chunk
    for seq_lens, adapter_ids in [((1, 17, 1, 17), (0, 1, 0, 1)), ((3,), (2,)), ((), ()), ((40,), (-1,)),
                                  ((0, 5, 0, 5), (3, 1, 1, 0))]:
        batch.update_(seq_lens, adapter_ids)
        live = torch.repeat_interleave(torch.tensor(adapter_ids, dtype=torch.int64),
                                       torch.tensor(seq_lens, dtype=torch.int64)).tolist()
        check_plans(batch, live + [-1] * (40 - len(live)))
        if seq_lens == (1, 17, 1, 17):  # uses every chunk of the bound cdiv(40, 16) + 4
            assert len(used_chunks(batch.segment_plan)) == batch.segment_plan.num_chunks == 7
    batch.update_(token_adapter=torch.tensor([1, 1, 7, -5, 0]), ranks=[2, 2, 2, 2], scalings=[1.0] * 4)
    check_plans(batch, [1, 1, -1, -1, 0] + [-1] * 35)  # ids out of range count as -1
    assert batch.adapter_rank.tolist() == [2] * 4 and batch.max_rank == 8
    assert metadata_pointers(batch) == pointers


def test_update_refuses_what_does_not_fit_and_leaves_the_batch():
    batch = lora_ops.LoRABatch.empty(8, RANKS, SCALINGS, max_seqs=2)
    batch.update_([3], [1])
    for args, kwargs, message in [
        (([5, 4], [0, 1]), {"ranks": [1] * 4, "scalings": SCALINGS},
         r"2 sequences of 9 tokens exceeds the batch's capacity of 8 tokens in 2 sequences"),
        (([1, 1, 1], [0, 1, 0]), {}, r"3 sequences of 3 tokens exceeds"),
        ((), {"token_adapter": torch.zeros(9, dtype=torch.int32)}, r"9 tokens exceeds"),
        (([2], [4]), {}, r"adapter ids must be -1 \(no adapter\) or a slot in \[0, 4\), got \[4\]"),
        ((), {"ranks": [16, 0, 0, 0], "scalings": SCALINGS}, r"ranks \[16, 0, 0, 0\] exceed the batch's max_rank 8"),
        ((), {"ranks": [1, 1, 1, 1]}, "give ranks and scalings together"),
    ]:
        with pytest.raises(ValueError, match=message):
            batch.update_(*args, **kwargs)
    check_plans(batch, [1] * 3 + [-1] * 5)
    assert batch.adapter_rank.tolist() == RANKS
    with pytest.raises(ValueError, match="update_ needs a fixed-capacity batch"):
        lora_ops.LoRABatch.build([2], [0], RANKS, SCALINGS).update_([1], [0])


def test_plans_by_device_ops_call_nothing_that_waits_for_the_device():
    """What reads device values back to the host (.item(), .tolist(), boolean-mask indexing,
    unique, bincount, nonzero) would synchronise on a GPU: the plans update_ computes by device
    ops (for ids already on the GPU) call none. (On the GPU, test_cuda_graphs runs update_ itself
    under torch.cuda.set_sync_debug_mode("error").)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount")

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    batch = lora_ops.LoRABatch.empty(32, RANKS, SCALINGS)
    ids = torch.tensor([0, 0, 3, -1, 1] * 5, dtype=torch.int32)
    batch.token_adapter[:25] = ids
    with RecordOps() as recorder:
        batch._plan_()
    assert recorder.names and not [name for name in recorder.names if name in syncing]
    check_plans(batch, ids.tolist() + [-1] * 7)


def test_segment_plan_bound_holds_for_random_batches_that_fit():
    gen = torch.Generator().manual_seed(0)
    for chunk_size, max_tokens, max_seqs in [(16, 50, 5), (32, 70, 9), (16, 17, 17)]:
        batch = lora_ops.LoRABatch.empty(max_tokens, RANKS, SCALINGS, max_seqs=max_seqs, chunk_size=chunk_size)
        for _ in range(20):
            num_seqs = int(torch.randint(0, max_seqs + 1, (1,), generator=gen))
            cuts = torch.randint(0, max_tokens + 1, (num_seqs,), generator=gen).sort().values.tolist()
            seq_lens = [hi - lo for lo, hi in zip([0] + cuts[:-1], cuts)]
            adapter_ids = torch.randint(-1, 4, (num_seqs,), generator=gen).tolist()
            batch.update_(seq_lens, adapter_ids)
            live = [a for a, n in zip(adapter_ids, seq_lens) for _ in range(n)]
            check_plans(batch, live + [-1] * (max_tokens - len(live)))


def test_copy_between_per_step_batches_of_equal_sizes():
    captured = lora_ops.LoRABatch.build([3, 2], [0, 1], [4, 4], [1.0, 1.0])
    captured.copy_(lora_ops.LoRABatch.build([1, 4], [1, -1], [4, 2], [1.0, 2.0]))
    check_plans(captured, [1, -1, -1, -1, -1])
    assert captured.adapter_rank.tolist() == [4, 2] and captured.segment_plan.chunks_needed == 2
    with pytest.raises(ValueError, match="batches need equal token counts"):
        captured.copy_(lora_ops.LoRABatch.build([6], [0], [4, 4], [1.0, 1.0]))


def test_metadata_shares_one_buffer_and_starts_on_16_byte_boundaries():
    """The metadata goes to the device in one copy, as views of one buffer; each view starts at a
    16-byte boundary, the pointer alignment Triton compiles its fast loads for."""
    for batch in (lora_ops.LoRABatch.build([3, 5, 1], [0, -1, 2], RANKS, SCALINGS),
                  lora_ops.LoRABatch.empty(37, RANKS, SCALINGS, max_seqs=5).update_([3, 30], [1, 0])):
        tensors = [batch.token_adapter, *batch.segment_plan.tensors(), *batch.sorted_plan.tensors()]
        assert len({tensor.untyped_storage().data_ptr() for tensor in tensors}) == 1
        assert all(tensor.data_ptr() % 16 == 0 for tensor in tensors + [batch.adapter_rank, batch.adapter_scaling])
