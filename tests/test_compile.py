"""torch.compile(fullgraph=True) of a module calling all five ops: no graph break, and no
recompile when only a fixed-capacity batch's contents change (counted by a recording backend)."""

import pytest
import torch

import lora_ops
from conftest import DEVICE, Dims, Scenario, fresh_generator, make_batch, requires_cuda
from test_layers import patch_toy
from test_serving import toy_with_two_adapters

DIMS = Dims()


class TinyLoRAModel(torch.nn.Module):
    """Embedding LoRA, then qkv and gate-up LoRA projections over one batch's metadata."""

    def __init__(self, num_slots: int, dtype=torch.float32):
        super().__init__()
        gen, _ = fresh_generator()
        d, r = DIMS, DIMS.max_rank

        def param(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype) / shape[-1] ** 0.5, requires_grad=False)

        self.embedding_a = param(num_slots, r, d.vocab)
        self.embedding_b = param(d.in_features, r)
        self.qkv_a = param(num_slots, 3 * r, d.in_features)
        self.qkv_b = param(num_slots, d.q_size + 2 * d.kv_size, r)
        self.gate_up_a = param(num_slots, 2 * r, d.in_features)
        self.gate_up_b = param(num_slots, 2 * d.intermediate, r)
        self.expand_b = param(num_slots, d.in_features, r)

    def forward(self, token_ids, x, batch, backend):
        hidden = x + lora_ops.embedding_a(token_ids, self.embedding_a, batch, backend=backend) @ self.embedding_b.T
        qkv = hidden.new_zeros(hidden.shape[0], DIMS.q_size + 2 * DIMS.kv_size)
        lora_ops.qkv_expand(lora_ops.sgmv_shrink(hidden, self.qkv_a, batch, 3, backend=backend),
                            self.qkv_b, batch, qkv, DIMS.q_size, DIMS.kv_size, backend=backend)
        gate_up = hidden.new_zeros(hidden.shape[0], 2 * DIMS.intermediate)
        lora_ops.gate_up_expand(lora_ops.sgmv_shrink(hidden, self.gate_up_a, batch, 2, backend=backend),
                                self.gate_up_b, batch, gate_up, backend=backend)
        out = hidden.clone()
        y = lora_ops.sgmv_shrink(hidden, self.qkv_a[:, :DIMS.max_rank].contiguous(), batch, 1, backend=backend)
        lora_ops.sgmv_expand(y, self.expand_b, batch, out, [0, DIMS.in_features], backend=backend)
        return qkv.sum(1, keepdim=True) + gate_up.sum(1, keepdim=True) + out


def _inputs(seq_lens, adapters):
    gen, _ = fresh_generator()
    batch = make_batch(Scenario("compile", seq_lens, adapters, (8, 4, 0)))
    s = batch.num_tokens
    return (torch.randint(0, DIMS.vocab, (s,), generator=gen).to(DEVICE),
            torch.randn(s, DIMS.in_features, generator=gen).to(DEVICE), batch)


class _GraphRecorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_compiles_without_graph_breaks_and_matches_eager(backend):
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    token_ids, x, batch = _inputs((3, 5, 2), (0, 1, -1))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    expected = model(token_ids, x, batch, backend)
    torch.testing.assert_close(compiled(token_ids, x, batch, backend), expected)


# Steps of one 10-token bucket: other adapters, ranks in use, max rank in use, live tokens.
STEPS = [([3, 5, 2], [0, 1, -1], [8, 4, 0]), ([1], [2], [8, 4, 2]), ([2, 2, 2, 2], [1, 0, 1, 0], [1, 2, 0]),
         ([], [], [0, 0, 0]), ([10], [1], [8, 8, 8])]


def _fixed_capacity_steps(batch, steps=STEPS):
    gen, _ = fresh_generator()
    for seq_lens, adapter_ids, ranks in steps:
        batch.update_(seq_lens, adapter_ids, ranks=ranks, scalings=[0.5, 1.0, 2.0])
        yield (torch.randint(0, DIMS.vocab, (batch.num_tokens,), generator=gen).to(DEVICE),
               torch.randn(batch.num_tokens, DIMS.in_features, generator=gen).to(DEVICE), batch)


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_fixed_capacity_batch_contents_never_recompile(backend):
    torch._dynamo.reset()
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    batch = lora_ops.LoRABatch.empty(10, [8, 4, 0], [1.0] * 3, max_seqs=4, max_rank=DIMS.max_rank, device=DEVICE)
    steps = STEPS if backend == "torch_native" else STEPS[1:3]  # Triton's interpreter is slow
    for token_ids, x, batch in _fixed_capacity_steps(batch, steps):
        torch.testing.assert_close(compiled(token_ids, x, batch, backend), model(token_ids, x, batch, backend))
    assert len(recorder.graphs) == 1


def test_buckets_compile_a_few_graphs_not_one_each():
    """Bucket sizes 1..64: a static graph, a dynamic one, and size 1 specialised (0/1)."""
    torch._dynamo.reset()
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    for bucket in (16, 1, 2, 4, 8, 32, 64, 24):
        batch = lora_ops.LoRABatch.empty(bucket, [8, 4, 0], [1.0] * 3, max_rank=DIMS.max_rank, device=DEVICE)
        for token_ids, x, batch in _fixed_capacity_steps(batch, [([1] * bucket, [i % 3 - 1 for i in range(bucket)], [8, 4, 2])]):
            torch.testing.assert_close(compiled(token_ids, x, batch, "torch_native"),
                                       model(token_ids, x, batch, "torch_native"))
    assert len(recorder.graphs) <= 3


def _serve_pool_steps(compile_model, device="cpu", dtype=torch.float32, **tolerance):
    """A patched toy model compiled by ``compile_model`` and served from one pool batch while
    requests change and an adapter is loaded; each step equals the eager model's."""
    block, adapters = toy_with_two_adapters()
    ours, pool = patch_toy(block.to(device, dtype), {"r4": adapters["r4"]})
    batch = pool.empty_batch(6, max_seqs=3)
    compiled = compile_model(ours)
    token_ids = torch.randint(0, 40, (1, 6), device=device)
    for names, seq_lens in [(["r4", None], [3, 2]), (["r4"], [6]), (["r2", "r4", None], [1, 1, 1]), ([], [])]:
        if names == ["r2", "r4", None]:
            pool.load("r2", *reversed(adapters["r2"]))
        with torch.no_grad(), pool.adapters(batch.update_(seq_lens, pool.slots(names))):
            torch.testing.assert_close(compiled(token_ids).clone(), ours(token_ids), **tolerance)


def test_patched_model_with_a_pool_batch_never_recompiles_on_new_contents_or_loads():
    torch._dynamo.reset()
    recorder = _GraphRecorder()
    _serve_pool_steps(lambda model: torch.compile(model, backend=recorder, fullgraph=True))
    assert len(recorder.graphs) == 1


def test_each_op_is_one_node_and_token_count_changes_do_not_recompile():
    torch._dynamo.reset()
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=True)
    for seq_lens in [(3, 5, 2), (4, 1, 6), (7, 2, 2), (1, 1, 1)]:
        token_ids, x, batch = _inputs(seq_lens, (0, 1, -1))
        torch.testing.assert_close(compiled(token_ids, x, batch, "torch_native"),
                                   model(token_ids, x, batch, "torch_native"))
    assert len(recorder.graphs) <= 2, "recompiled more than once"
    assert _lora_targets(recorder.graphs[-1].graph) == _ALL_OPS_IN_ORDER


_ALL_OPS_IN_ORDER = ["lora.embedding_a", "lora.sgmv_shrink", "lora.qkv_expand", "lora.sgmv_shrink",
                     "lora.gate_up_expand", "lora.sgmv_shrink", "lora.sgmv_expand"]


def _lora_targets(graph) -> list[str]:
    return [str(node.target).removesuffix(".default") for node in graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lora.")]


@pytest.mark.parametrize("tracer", ["make_fx", "export"])
def test_tracers_without_dynamo_record_every_op(tracer):
    """make_fx and non-strict torch.export trace through dispatch modes: the Python functions
    then call the ops (their direct eager path would hide the LoRA from the graph)."""
    model = TinyLoRAModel(num_slots=3).to(DEVICE)
    token_ids, x, batch = _inputs((3, 5, 2), (0, 1, -1))

    class Forward(torch.nn.Module):  # the batch is a constant of the traced function
        def forward(self, token_ids, x):
            return model(token_ids, x, batch, "torch_native")

    if tracer == "make_fx":
        graph = torch.fx.experimental.proxy_tensor.make_fx(Forward())(token_ids, x).graph
    else:
        graph = torch.export.export(Forward(), (token_ids, x), strict=False).graph
    assert _lora_targets(graph) == _ALL_OPS_IN_ORDER


# ---- on the GPU: cudagraph trees (mode="reduce-overhead") and the default mode, bfloat16 ----


@requires_cuda
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
@pytest.mark.parametrize("backend", ["auto", "triton", "csgmv"])
def test_compiled_on_the_gpu_never_recompiles_on_new_contents(mode, backend, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)  # a skipped graph fails
    torch._dynamo.reset()
    counters.clear()
    model = TinyLoRAModel(num_slots=3, dtype=torch.bfloat16).cuda()
    compiled = torch.compile(model, mode=mode, fullgraph=True)
    batches = {bucket: lora_ops.LoRABatch.empty(bucket, [8, 4, 0], [1.0] * 3, max_rank=DIMS.max_rank, device="cuda")
               for bucket in (16, 64, 256)}
    for bucket, batch in batches.items():
        for token_ids, x, batch in _fixed_capacity_steps(batch):
            token_ids, x = token_ids.cuda(), x.cuda().to(torch.bfloat16)
            out = compiled(token_ids, x, batch, backend).clone()  # the next replay overwrites it
            torch.testing.assert_close(out, model(token_ids, x, batch, backend), atol=0.05, rtol=0.02)
        if bucket == 16:
            assert counters["stats"]["unique_graphs"] == 1, "recompiled for new contents"
    assert counters["stats"]["unique_graphs"] <= 4, "a recompile per bucket or more"
    assert not counters["inductor"]["cudagraph_skips"]


@requires_cuda
def test_reduce_overhead_with_torch_native_refuses_clearly():
    model = TinyLoRAModel(num_slots=3, dtype=torch.bfloat16).cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    batch = lora_ops.LoRABatch.empty(16, [8, 4, 0], [1.0] * 3, max_rank=DIMS.max_rank, device="cuda")
    with pytest.raises(Exception, match="torch_native backend reads adapter ranks"):
        for token_ids, x, batch in _fixed_capacity_steps(batch):
            compiled(token_ids.cuda(), x.cuda().to(torch.bfloat16), batch, "torch_native")


@requires_cuda
def test_patched_model_under_reduce_overhead_never_recompiles(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    torch._dynamo.reset()
    counters.clear()
    _serve_pool_steps(lambda model: torch.compile(model, mode="reduce-overhead", fullgraph=True),
                      "cuda", torch.bfloat16, atol=0.05, rtol=0.02)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["inductor"]["cudagraph_skips"]
