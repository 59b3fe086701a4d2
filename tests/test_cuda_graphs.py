"""CUDA graphs with fixed-capacity batches: capture once per bucket, then before each replay
``update_`` the batch with anything that fits -- fewer live tokens, more chunks than at capture,
other adapters and ranks, no LoRA at all, a skewed batch, contents for which a per-step batch's
``auto`` would pick the other backend. Every replay must equal eager execution of the same batch
(bit for bit: the same kernels run) and the float64 reference (the tests' error rule)."""

import pytest
import torch

import lora_ops
from conftest import OP_CASES, Dims, assert_close_to_reference, capture_op, fresh_generator, requires_cuda
from test_layers import patch_toy
from test_serving import toy_with_two_adapters

pytestmark = requires_cuda

DIMS = Dims(in_features=512, max_rank=32, q_size=512, kv_size=128, intermediate=384, vocab=1000)
RANKS = (32, 8, 16, 0, 32, 4, 24, 32)
OTHER_RANKS = (4, 32, 8, 16, 0, 1, 2, 3)


def scalings(ranks):
    return [0.5 + 0.25 * slot for slot in range(len(ranks))]


# bucket name -> (max_tokens, max_seqs, captured contents, replayed contents: name -> (seq_lens, adapter_ids, ranks))
BUCKETS = {
    # few long sequences: the static plan sizes make auto keep token order (triton)
    "prefill": (256, 8, ((256,), (0,)), {
        "fewer_live_tokens": ((5, 3), (1, 2), RANKS),
        "more_chunks": ((1, 100, 3, 152), (1, 2, -1, 5), RANKS),
        "other_adapters_and_ranks": ((60, 70, 62, 64), (6, 4, 2, 3), OTHER_RANKS),
        "no_lora": ((100, 100), (-1, -1), RANKS),
        "skewed": ((200, 1, 1, 1, 1, 1), (1, 0, 2, 4, 5, 6), RANKS),
        "per_step_auto_would_sort": ((1,) * 8, (0, 1) * 4, RANKS),
    }),
    # one token per sequence: auto sorts by adapter (csgmv)
    "decode": (32, 32, ((1,) * 32, (0,) * 32), {
        "fewer_live_tokens": ((1,) * 7, (1, 2, -1, 5, 5, 0, 7), RANKS),
        "other_adapters_and_ranks": ((1,) * 32, tuple(i % 8 for i in range(32)), OTHER_RANKS),
        "no_lora": ((1,) * 20, (-1,) * 20, RANKS),
        "per_step_auto_would_keep_order": ((32,), (2,), RANKS),
    }),
}


def capture(op_case, batch, backend, gen):
    inputs = op_case.build(batch, DIMS, torch.bfloat16, gen)
    return (*capture_op(op_case, inputs, batch, backend), inputs)


def new_inputs(op_case, static_inputs, batch, gen):
    for name, value in op_case.build(batch, DIMS, torch.bfloat16, gen).items():
        if isinstance(value, torch.Tensor):
            static_inputs[name].copy_(value)


def check_replay(op_case, graph, inputs, out, batch, backend, what, seed):
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, op_case.reference(inputs, batch, torch.float64),
                              op_case.reference(inputs, batch, torch.bfloat16), what, seed)
    assert torch.equal(out, op_case.run(inputs, batch, backend)), f"{what}: replay differs from eager"


@pytest.mark.parametrize("backend", ["triton", "csgmv", "auto"])
@pytest.mark.parametrize("bucket", BUCKETS, ids=str)
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_replay_with_anything_that_fits_the_bucket(op_case, bucket, backend, matmul_kernels):
    max_tokens, max_seqs, captured, replays = BUCKETS[bucket]
    gen, seed = fresh_generator()
    batch = lora_ops.LoRABatch.empty(max_tokens, RANKS, scalings(RANKS), max_seqs=max_seqs,
                                     max_rank=DIMS.max_rank, device="cuda").update_(*captured)
    graph, out, inputs = capture(op_case, batch, backend, gen)
    for name, (seq_lens, adapter_ids, ranks) in replays.items():
        batch.update_(seq_lens, adapter_ids, ranks=ranks, scalings=scalings(ranks))
        if name.startswith("per_step_auto"):
            per_step = lora_ops.LoRABatch.build(seq_lens, adapter_ids, ranks, scalings(ranks), device="cuda")
            assert per_step.prefers_adapter_sorting != batch.prefers_adapter_sorting
        new_inputs(op_case, inputs, batch, gen)
        check_replay(op_case, graph, inputs, out, batch, backend, f"graph/{op_case.name}/{bucket}/{name}/{backend}", seed)


def test_update_neither_synchronises_nor_reallocates():
    batch = lora_ops.LoRABatch.empty(64, RANKS, scalings(RANKS), max_seqs=8, device="cuda")
    pointers = [t.data_ptr() for plan in ("segment", "sorted") for t in batch.op_metadata(plan)]
    token_adapter = torch.randint(-1, 8, (50,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch.update_(token_adapter=token_adapter)
        batch.update_([3, 20, 7], [1, -1, 4], ranks=OTHER_RANKS, scalings=scalings(OTHER_RANKS))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [t.data_ptr() for plan in ("segment", "sorted") for t in batch.op_metadata(plan)] == pointers
    assert batch.token_adapter.tolist() == [1] * 3 + [-1] * 20 + [4] * 7 + [-1] * 34


def test_torch_native_refuses_capture_with_a_clear_error():
    gen, _ = fresh_generator()
    op_case = OP_CASES[0]
    batch = lora_ops.LoRABatch.empty(16, RANKS, scalings(RANKS), device="cuda").update_([4, 4], [0, 1])
    inputs = op_case.build(batch, DIMS, torch.bfloat16, gen)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="torch_native backend reads adapter ranks and scalings back to the host"):
        with torch.cuda.graph(graph):
            op_case.run(inputs, batch, "torch_native")


@pytest.mark.parametrize("backend", ["triton", "csgmv"])
def test_two_buckets_replayed_at_once_on_two_streams(backend):
    gen, seed = fresh_generator()
    op_case = next(case for case in OP_CASES if case.name == "qkv_expand")
    captured = []
    for max_tokens in (8, 64):
        batch = lora_ops.LoRABatch.empty(max_tokens, RANKS, scalings(RANKS), max_rank=DIMS.max_rank, device="cuda")
        graph, out, inputs = capture(op_case, batch, backend, gen)
        captured.append((batch, graph, inputs, out))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for step in range(5):
        for batch, _, inputs, _ in captured:
            live = int(torch.randint(0, batch.num_tokens + 1, (1,), generator=gen))
            batch.update_(token_adapter=torch.randint(-1, 8, (live,), generator=gen).cuda())
            new_inputs(op_case, inputs, batch, gen)
        torch.cuda.synchronize()
        for (batch, graph, inputs, out), stream in zip(captured, streams):
            out.fill_(float("nan"))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda._sleep(2_000_000)  # ~1 ms: both replays are queued before either runs
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for batch, _, inputs, out in captured:
            assert torch.equal(out, op_case.run(inputs, batch, backend)), f"two streams/{backend}/step {step}"


def test_patched_model_graphs_per_bucket_follow_requests_and_loads():
    """The layers under graphs: one graph per bucket captured with a pool batch; requests join
    and leave, and an adapter loaded after capture is served with its rank."""
    block, adapters = toy_with_two_adapters()
    ours, pool = patch_toy(block.cuda().to(torch.bfloat16), {"r4": adapters["r4"]})
    graphs = {}
    with torch.no_grad():
        for bucket in (4, 16):
            batch = pool.empty_batch(bucket)
            token_ids = torch.zeros(bucket, 1, dtype=torch.long, device="cuda")  # one decode token per request
            with pool.adapters(batch):
                ours(token_ids)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = ours(token_ids)
            graphs[bucket] = (graph, batch, token_ids, out)
        requests = [["r4", None, "r4"], ["r4"] * 9, ["r2", "r4", None, "r2"], [None] * 2, ["r2"] * 16]
        for step, names in enumerate(requests):
            if step == 2:
                pool.load("r2", *reversed(adapters["r2"]))
            graph, batch, token_ids, out = graphs[4 if len(names) <= 4 else 16]
            batch.update_([1] * len(names), pool.slots(names))
            token_ids.copy_(torch.randint(0, 40, token_ids.shape))
            graph.replay()
            with pool.adapters(batch):
                expected = ours(token_ids)
            torch.testing.assert_close(out, expected, msg=f"step {step}: {names}")


def test_shrink_on_the_side_stream_equals_the_sequential_path(monkeypatch):
    """``pool.overlap_shrink``: in a captured graph the layers run the shrink on a side stream
    beside the base GEMM; eager calls stay on the main stream. Eager and replayed from a graph
    (new inputs, other adapters), the output equals the sequential path's bit for bit, and the
    captured shrinks really ran on the side stream."""
    block, adapters = toy_with_two_adapters()
    ours, pool = patch_toy(block.cuda().to(torch.bfloat16), adapters)
    shrink_streams = []
    shrink = lora_ops.ops.sgmv_shrink

    def recording_shrink(*args, **kwargs):
        shrink_streams.append(torch.cuda.current_stream())
        return shrink(*args, **kwargs)

    monkeypatch.setattr(lora_ops.ops, "sgmv_shrink", recording_shrink)
    batch = pool.empty_batch(16)
    token_ids = torch.zeros(16, 1, dtype=torch.long, device="cuda")

    def run(overlap, names):
        pool.overlap_shrink = overlap
        batch.update_([1] * len(names), pool.slots(names))
        with torch.no_grad(), pool.adapters(batch):
            return ours(token_ids).clone()

    pool.overlap_shrink = True
    with torch.no_grad(), pool.adapters(batch):
        ours(token_ids)  # compiles the kernels before the capture
    torch.cuda.synchronize()
    main = torch.cuda.current_stream()
    assert shrink_streams and all(stream == main for stream in shrink_streams), "eager shrinks left the main stream"
    eager_shrinks = len(shrink_streams)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), pool.adapters(batch), torch.cuda.graph(graph):
        capture_stream = torch.cuda.current_stream()
        replayed = ours(token_ids)
    captured = shrink_streams[eager_shrinks:]
    assert captured and all(stream not in (main, capture_stream) for stream in captured), \
        "the captured shrinks ran on the capture stream"
    for names in (["r4", None, "r2"] * 5, ["r2"] * 16, [None] * 3):
        token_ids.copy_(torch.randint(0, 40, token_ids.shape))
        sequential = run(False, names)
        assert torch.equal(run(True, names), sequential), f"eager, overlap_shrink on: {names}"
        graph.replay()
        assert torch.equal(replayed, sequential), f"replayed side stream: {names}"
