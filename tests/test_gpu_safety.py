"""What real engines do on a GPU: several streams at once, concurrent graph replays, batches past
CUDA's 65535 programs per grid axis, and many calls in one process. Each result is checked
against the float64 reference (or bit for bit against a fresh computation)."""

import pytest
import torch

import lora_ops
from conftest import (
    OP_CASES, Dims, Scenario, assert_close_to_reference, capture_op, force_matmul_kernels,
    fresh_generator, make_batch, requires_cuda,
)

pytestmark = requires_cuda

DIMS = Dims(in_features=1024, max_rank=16, q_size=512, kv_size=128, intermediate=384, vocab=1000)
SHRINK = next(case for case in OP_CASES if case.name == "shrink_3slice")
QKV_EXPAND = next(case for case in OP_CASES if case.name == "qkv_expand")
RANKS = (16, 8, 16, 4)
# 64 one-token sequences over 4 slots: decode-sized chunks, so the chunk kernel splits K
DECODE = Scenario("decode", (1,) * 64, tuple(i % 4 for i in range(64)), RANKS)
PREFILL = Scenario("prefill", (300, 200, 500), (2, 0, 1), RANKS)
SLEEP_CYCLES = 2_000_000  # ~1 ms: both streams' kernels are queued before either starts


def check(op_case, inputs, batch, out, what, seed):
    assert_close_to_reference(out, op_case.reference(inputs, batch, torch.float64),
                              op_case.reference(inputs, batch, torch.bfloat16), what, seed)


@pytest.mark.parametrize("backend", ["triton", "csgmv"])
@pytest.mark.parametrize("scenario", [DECODE, PREFILL], ids=lambda s: s.name)
def test_split_k_shrinks_on_two_streams_at_once(backend, scenario, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token=False)
    gen, seed = fresh_generator()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    work = []
    for stream in streams:
        batch = make_batch(scenario, device="cuda")
        work.append((stream, batch, SHRINK.build(batch, DIMS, torch.bfloat16, gen)))
    for _ in range(10):
        outputs = []
        for stream, batch, inputs in work:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda._sleep(SLEEP_CYCLES)
                outputs.append(SHRINK.run(inputs, batch, backend))
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for (_, batch, inputs), out in zip(work, outputs):
            check(SHRINK, inputs, batch, out, f"two streams/{scenario.name}/{backend}", seed)
    # and a later call on one stream is still right
    _, batch, inputs = work[0]
    check(SHRINK, inputs, batch, SHRINK.run(inputs, batch, backend), f"after/{backend}", seed)


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "chunk"])
@pytest.mark.parametrize("backend", ["triton", "csgmv"])
def test_each_kernel_reads_what_the_kernel_before_it_wrote(backend, per_token, monkeypatch):
    """On Hopper the LoRA kernels are dependent launches: they may be scheduled while the kernel
    before them drains, and must still read its results. Every round, a kernel right before the
    shrink rewrites x, and one right before the expand rewrites y (the one before it, the base)."""
    from csrc_triton.common import dependent_launch

    force_matmul_kernels(monkeypatch, per_token=per_token)
    gen, seed = fresh_generator()
    batch = make_batch(DECODE, device="cuda")
    shrink_in = SHRINK.build(batch, DIMS, torch.bfloat16, gen)
    expand_in = QKV_EXPAND.build(batch, DIMS, torch.bfloat16, gen)
    x, y, base = shrink_in["x"], expand_in["y"], expand_in["base"]
    assert dependent_launch(base) == (torch.cuda.get_device_capability()[0] >= 9)
    rounds = [[torch.randn(t.shape, generator=gen).to("cuda", t.dtype) for t in (x, base, y)]
              for _ in range(20)]
    torch.cuda.synchronize()
    results = []
    for new_x, new_base, new_y in rounds:
        torch.neg(new_x, out=x)  # an elementwise kernel, then the shrink reading its output
        shrunk = SHRINK.run(shrink_in, batch, backend)
        torch.neg(new_base, out=base)
        torch.neg(new_y, out=y)
        QKV_EXPAND.run_in_place(expand_in, batch, backend)
        results.append((shrunk, base.clone()))
    torch.cuda.synchronize()
    for (new_x, new_base, new_y), (shrunk, expanded) in zip(rounds, results):
        check(SHRINK, {**shrink_in, "x": -new_x}, batch, shrunk, f"shrink/{backend}", seed)
        check(QKV_EXPAND, {**expand_in, "base": -new_base, "y": -new_y}, batch, expanded,
              f"expand/{backend}", seed)


@pytest.mark.parametrize("backend", ["triton", "csgmv"])
def test_two_graphs_replayed_at_once(backend, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token=False)
    gen, seed = fresh_generator()
    captured = []
    for scenario in (DECODE, DECODE, PREFILL):
        batch = make_batch(scenario, device="cuda")
        inputs = SHRINK.build(batch, DIMS, torch.bfloat16, gen)
        graph, out = capture_op(SHRINK, inputs, batch, backend)
        captured.append((graph, batch, inputs, out))
    streams = [torch.cuda.Stream() for _ in captured]
    for _ in range(10):
        for (graph, _, _, out), stream in zip(captured, streams):
            out.fill_(float("nan"))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda._sleep(SLEEP_CYCLES)
                graph.replay()
        eager_batch, eager_inputs = captured[0][1], captured[0][2]
        eager_out = SHRINK.run(eager_inputs, eager_batch, backend)  # beside the replays
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for graph, batch, inputs, out in captured:
            check(SHRINK, inputs, batch, out, f"two graphs/{backend}", seed)
        check(SHRINK, eager_inputs, eager_batch, eager_out, f"eager beside graphs/{backend}", seed)


LARGE_DIMS = Dims(in_features=32, max_rank=8, q_size=16, kv_size=8, intermediate=16, vocab=64)
LARGE_OPS = [case for case in OP_CASES if case.name in ("shrink_2slice", "gate_up_expand", "embedding_a")]


@pytest.mark.parametrize("op_case", LARGE_OPS, ids=lambda c: c.name)
def test_131072_one_token_segments_on_every_backend(op_case, matmul_kernels):
    gen, seed = fresh_generator()
    num_tokens = 131072
    adapters = torch.randint(-1, 4, (num_tokens,), generator=gen)
    batch = lora_ops.LoRABatch.from_token_adapters(adapters, [8, 3, 0, 5], [0.5, 1.0, 2.0, 1.5], device="cuda")
    inputs = op_case.build(batch, LARGE_DIMS, torch.bfloat16, gen)
    for backend in ("torch_native", "triton", "csgmv"):
        out = op_case.run(inputs, batch, backend)
        torch.cuda.synchronize()
        check(op_case, inputs, batch, out, f"131072 tokens/{op_case.name}/{backend}", seed)


@pytest.mark.parametrize("op_case", LARGE_OPS[:2], ids=lambda c: c.name)
def test_more_than_65535_chunks(op_case, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token=False)
    gen, seed = fresh_generator()
    lens = torch.full((4096,), 300)  # 1.2 M tokens: over 65535 chunks of 16 in either plan
    batch = lora_ops.LoRABatch.build(lens, torch.randint(0, 4, (4096,), generator=gen), [8, 3, 6, 5],
                                     [0.5, 1.0, 2.0, 1.5], device="cuda", chunk_size=16)
    assert min(batch.sorted_plan.chunks_needed, batch.segment_plan.chunks_needed) > 65535
    inputs = op_case.build(batch, LARGE_DIMS, torch.bfloat16, gen)
    for backend in ("triton", "csgmv"):
        out = op_case.run(inputs, batch, backend)
        torch.cuda.synchronize()
        check(op_case, inputs, batch, out, f"65600 chunks/{op_case.name}/{backend}", seed)


def test_no_state_leaks_between_calls(matmul_kernels):
    """Calls of different shapes, backends, kernel families and graphs in one process: every
    call gives bit for bit what the same call gave first, in a fresh state."""
    gen, _ = fresh_generator()
    calls = []
    for scenario in (DECODE, PREFILL, Scenario("no_adapter", (1,) * 32, (-1,) * 32, RANKS)):
        for op_case in OP_CASES:
            batch = make_batch(scenario, device="cuda")
            calls.append((op_case, batch, op_case.build(batch, DIMS, torch.bfloat16, gen)))
    backends = ("triton", "csgmv")
    first = {(i, b): call[0].run(call[2], call[1], b).clone() for i, call in enumerate(calls) for b in backends}
    for i, (op_case, batch, inputs) in enumerate(calls):  # graphs in between
        graph, _ = capture_op(op_case, inputs, batch, backends[i % 2])
        for _ in range(3):
            graph.replay()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # and eager calls on another stream
        for op_case, batch, inputs in calls:
            op_case.run(inputs, batch, "csgmv")
    torch.cuda.current_stream().wait_stream(side)
    for (i, backend), expected in first.items():
        op_case, batch, inputs = calls[i]
        again = op_case.run(inputs, batch, backend)
        assert torch.equal(again, expected), f"{op_case.name}/{backend}: differs after other calls"
