"""CUDA graphs: capture once, replay with new batch contents copied into the captured buffers."""

import pytest
import torch

from conftest import (
    OP_CASES, Dims, Scenario, assert_close_to_reference, fresh_generator, make_batch, requires_cuda,
)

DIMS = Dims(in_features=512, max_rank=32, q_size=512, kv_size=128, intermediate=384, vocab=1000)
RANKS = (32, 8, 16, 0, 32, 4, 24, 32)
# Capture with a batch whose tokens all share one adapter (one run: few chunks) ...
CAPTURED = Scenario("one_run", (64,) * 4, (0,) * 4, RANKS)
# ... and replay with batches of the same token count and sequence count but more chunks,
# other ranks in use, and tokens without adapter.
REPLAYED = [
    Scenario("interleaved", (1, 100, 3, 152), (1, 2, -1, 5), RANKS),
    Scenario("every_slot", (60, 70, 62, 64), (6, 4, 2, 1), RANKS),
]


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "csgmv"])
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_replay_with_more_chunks_than_captured(op_case, backend, matmul_kernels):
    gen, seed = fresh_generator()
    static_batch = make_batch(CAPTURED, device="cuda")
    static_inputs = op_case.build(static_batch, DIMS, torch.bfloat16, gen)
    op_case.run(static_inputs, static_batch, backend)  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op_case.run(static_inputs, static_batch, backend)

    def used_chunks(batch):
        return int((batch.plan(backend).chunk_len > 0).sum())

    captured_chunks = used_chunks(static_batch)
    for scenario in REPLAYED:
        batch = make_batch(scenario, device="cuda")
        assert used_chunks(batch) > captured_chunks
        inputs = op_case.build(batch, DIMS, torch.bfloat16, gen)
        static_batch.copy_(batch)
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                static_inputs[name].copy_(value)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_out, op_case.reference(inputs, batch, torch.float64),
                                  op_case.reference(inputs, batch, torch.bfloat16),
                                  f"graph/{op_case.name}/{scenario.name}/{backend}", seed)
