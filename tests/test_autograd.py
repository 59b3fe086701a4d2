"""Training: gradients of every op and backend.

- gradcheck in float64 of every differentiable twin op (``lora::*_autograd``) on torch_native;
- opcheck of the twins with inputs that require grad (autograd registration, AOT dispatch);
- each backend's gradients against an independent per-adapter reference (``F.linear`` /
  ``F.embedding`` per adapter on its own tokens), with the data-derived tolerance rule;
- ``torch.compile(fullgraph=True)`` of a training step; on the GPU, bfloat16 gradients and a
  training step captured in a CUDA graph.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lora_ops
from conftest import (
    DEVICE, OP_CASES, SCENARIOS, Dims, RecordLoraCalls, Scenario, assert_close_to_reference, backends_for,
    force_matmul_kernels, fresh_generator, kernel_backends, make_batch, requires_cuda,
)

# Heterogeneous ranks, a rank-0 slot (2), tokens without adapter and a zero-length sequence ...
MIXED = SCENARIOS[0]
# ... the same, smaller (gradcheck, opcheck and the per-token kernels in the interpreter) ...
TINY_MIXED = Scenario("tiny_mixed", (3, 0, 2, 1, 4), (0, 2, -1, 1, 0), (4, 2, 0))
TINY = Dims(in_features=8, max_rank=4, q_size=6, kv_size=2, intermediate=5, vocab=12)
# ... and one adapter holding 90 % of the tokens, its run crossing chunk boundaries.
SKEWED_90 = Scenario("skewed_90", (2, 45, 1, 2), (0, 1, -1, 2), (4, 8, 2))
# (name, slice widths, the expand call)
LAYERS = [
    ("qkv", (24, 8, 8), lambda y, B, b, base, be: lora_ops.qkv_expand(y, B, b, base, 24, 8, backend=be, in_place=False)),
    ("gate_up", (20, 20), lambda y, B, b, base, be: lora_ops.gate_up_expand(y, B, b, base, backend=be, in_place=False)),
    ("one_slice", (12,), lambda y, B, b, base, be: lora_ops.sgmv_expand(y, B, b, base, [0, 12], backend=be, in_place=False)),
]


def _twin_call(op_case, backend="torch_native", dtype=torch.float32):
    """The differentiable twin op call that ``op_case``'s function makes when its float inputs
    require grad: (op, args, indices of the args that are differentiable)."""
    gen, _ = fresh_generator()
    batch = make_batch(TINY_MIXED)
    inputs = op_case.build(batch, TINY, dtype, gen)
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value.requires_grad_()
    with RecordLoraCalls() as recorder:
        op_case.run(inputs, batch, backend)
    (op, args, _), = recorder.calls
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    return op, [a.detach() if isinstance(a, torch.Tensor) else a for a in args], differentiable


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_gradcheck_float64_torch_native(op_case):
    op, args, differentiable = _twin_call(op_case)
    assert op.name().endswith("_autograd")
    # finite values past the rank too: finite differences must not see NaN there
    leaves = [torch.nan_to_num(args[i], nan=0.5).double().requires_grad_() for i in differentiable]

    def call(*tensors):
        full = list(args)
        for i, tensor in zip(differentiable, tensors):
            full[i] = tensor
        return op(*full)

    assert torch.autograd.gradcheck(call, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_opcheck_with_inputs_that_require_grad(op_case, backend):
    op, args, differentiable = _twin_call(op_case, backend)
    args = [a.requires_grad_() if i in differentiable else a for i, a in enumerate(args)]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- gradients against a per-adapter reference --------------------------------------------------


def _layer_inputs(batch, widths, dims, dtype, gen):
    """x, A, B, base and the upstream gradient; A and B hold NaN past each slot's rank."""
    s, n, r, device = batch.num_tokens, len(widths), dims.max_rank, batch.device

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    A = rand(batch.num_slots, n * r, dims.in_features, scale=dims.in_features**-0.5)
    B = rand(batch.num_slots, sum(widths), r, scale=r**-0.5)
    for slot, rank in enumerate(batch.adapter_rank.tolist()):
        A[slot].view(n, r, -1)[:, rank:] = float("nan")
        B[slot, :, rank:] = float("nan")
    return dict(x=rand(s, dims.in_features), A=A, B=B, base=rand(s, sum(widths)), grad=rand(s, sum(widths)))


def _slots(batch):
    """(slot, rank, scaling, token rows) of every slot with rank > 0 and tokens."""
    for slot, (rank, scaling) in enumerate(zip(batch.adapter_rank.tolist(), batch.adapter_scaling.tolist())):
        rows = (batch.token_adapter == slot).nonzero().squeeze(1)
        if rank and rows.numel():
            yield slot, rank, scaling, rows


def _reference_layer(x, A, B, base, batch, widths):
    """base + c * F.linear(F.linear(x_l, A_l slice), B_l slice) per adapter on its own tokens."""
    max_rank = A.shape[1] // len(widths)
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    out = base
    for slot, rank, scaling, rows in _slots(batch):
        x_l = x[rows]
        deltas = [scaling * F.linear(F.linear(x_l, A[slot, i * max_rank : i * max_rank + rank]), B[slot, lo:hi, :rank])
                  for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:]))]
        out = out.index_add(0, rows, torch.cat(deltas, dim=1))
    return out


def _reference_grads(inputs, names, forward, dtype):
    """Gradients of (forward(...) * grad).sum() with respect to ``names``, computed in ``dtype``."""
    leaves = {name: inputs[name].detach().to(dtype).nan_to_num(0.0).requires_grad_() for name in names}
    out = forward(**leaves)
    out.backward(inputs["grad"].to(dtype))
    return {name: leaf.grad for name, leaf in leaves.items()}


def _check_grads(inputs, names, run, reference, dtype, what, seed):
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in names}
    run(**leaves).backward(inputs["grad"])
    ref64 = _reference_grads(inputs, names, reference, torch.float64)
    ref_lowp = _reference_grads(inputs, names, reference, dtype)
    for name in names:
        assert_close_to_reference(leaves[name].grad, ref64[name], ref_lowp[name], f"{what}: d{name}", seed)


def check_layer_grads(scenario, layer, backend, dtype=torch.float32, dims=Dims(), device=DEVICE):
    name, widths, expand = layer
    gen, seed = fresh_generator()
    batch = make_batch(scenario, device=device)
    inputs = _layer_inputs(batch, widths, dims, dtype, gen)
    n = len(widths)

    def run(x, A, B, base):
        return expand(lora_ops.sgmv_shrink(x, A, batch, n, backend=backend), B, batch, base, backend)

    def reference(x, A, B, base):
        return _reference_layer(x, A, B, base, batch, widths)

    _check_grads(inputs, ("x", "A", "B", "base"), run, reference, dtype,
                 f"{name}/{scenario.name}/{backend}/{dtype}", seed)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
@pytest.mark.parametrize("scenario", [MIXED, SKEWED_90], ids=lambda s: s.name)
def test_layer_grads_match_per_adapter_reference(scenario, layer, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token=False)
    for backend in backends_for(torch.float32):
        check_layer_grads(scenario, layer, backend)


@pytest.mark.parametrize("layer", LAYERS[:2], ids=lambda layer: layer[0])
def test_per_token_kernel_grads_match_per_adapter_reference(layer, monkeypatch):
    force_matmul_kernels(monkeypatch, per_token=True)
    for backend in kernel_backends():
        check_layer_grads(TINY_MIXED, layer, backend, dims=TINY)


@pytest.mark.parametrize("target_programs, max_group", [(1, 256), (3, 256), (1, 2)],
                         ids=["one_group", "groups_cut_runs", "groups_capped"])
def test_weight_grads_when_each_program_walks_many_chunks(target_programs, max_group, monkeypatch):
    """Programs that walk many chunks: one group per output tile (every run of the plan in one
    program), groups whose boundaries fall inside runs, and groups capped at two chunks."""
    import csrc_triton.grad

    monkeypatch.setattr(csrc_triton.grad, "_TARGET_PROGRAMS", target_programs)
    monkeypatch.setattr(csrc_triton.grad, "_MAX_GROUP", max_group)
    force_matmul_kernels(monkeypatch, per_token=False)
    for backend in kernel_backends():
        check_layer_grads(SKEWED_90, LAYERS[0], backend)
        check_layer_grads(MIXED, LAYERS[0], backend)


@pytest.mark.parametrize("records_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
def test_out_of_place_expand_writes_every_row(layer, records_grad, monkeypatch):
    """The out-of-place expand (training's) returns base + delta in a new tensor: every row,
    tokens without adapter and of rank-0 slots included, though its buffer starts as NaN."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: real_empty_like(*args, **kwargs).fill_(float("nan")))
    force_matmul_kernels(monkeypatch, per_token=False)
    name, widths, expand = layer
    for backend in backends_for(torch.float32):
        gen, seed = fresh_generator()
        batch = make_batch(MIXED)
        inputs = _layer_inputs(batch, widths, Dims(), torch.float32, gen)
        x, A, B, base = (inputs[key].clone().requires_grad_(records_grad) for key in ("x", "A", "B", "base"))
        out = expand(lora_ops.sgmv_shrink(x, A, batch, len(widths), backend=backend), B, batch, base, backend)
        assert out.data_ptr() != base.data_ptr() and torch.equal(base.detach(), inputs["base"])

        def reference(dtype):
            clean = [inputs[key].to(dtype).nan_to_num(0.0) for key in ("x", "A", "B", "base")]
            return _reference_layer(*clean, batch, widths)

        assert_close_to_reference(out.detach(), reference(torch.float64), reference(torch.float32),
                                  f"{name}/{backend}/records_grad={records_grad}", seed)


def test_input_gradient_writes_every_row(monkeypatch):
    """dx comes from torch.empty and the expand kernel writes every row of it (zeros for tokens
    without adapter): poisoned with NaN, an unwritten row fails the gradient check."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: real_empty(*args, **kwargs).fill_(float("nan")))
    force_matmul_kernels(monkeypatch, per_token=False)
    for backend in kernel_backends():
        for layer in LAYERS:
            check_layer_grads(MIXED, layer, backend)


def check_embedding_grads(scenario, backend, dtype=torch.float32, dims=Dims(), device=DEVICE):
    gen, seed = fresh_generator()
    batch = make_batch(scenario, device=device)
    r, width = dims.max_rank, dims.in_features
    A = torch.randn(batch.num_slots, r, dims.vocab, generator=gen).to(device, dtype)
    for slot, rank in enumerate(batch.adapter_rank.tolist()):
        A[slot, rank:] = float("nan")
    # few distinct ids, so that tokens share vocabulary columns (the scatter must add)
    ids = torch.randint(0, 6, (batch.num_tokens,), generator=gen).to(device)
    inputs = dict(A=A, B=(torch.randn(batch.num_slots, width, r, generator=gen) / r**0.5).to(device, dtype),
                  base=torch.randn(batch.num_tokens, width, generator=gen).to(device, dtype),
                  grad=torch.randn(batch.num_tokens, width, generator=gen).to(device, dtype))
    for slot, rank in enumerate(batch.adapter_rank.tolist()):
        inputs["B"][slot, :, rank:] = float("nan")

    def run(A, B, base):
        y = lora_ops.embedding_a(ids, A, batch, backend=backend)
        return lora_ops.sgmv_expand(y, B, batch, base, [0, width], backend=backend, in_place=False)

    def reference(A, B, base):
        out = base
        for slot, rank, scaling, rows in _slots(batch):
            y_l = F.embedding(ids[rows], A[slot, :rank].T)
            out = out.index_add(0, rows, scaling * F.linear(y_l, B[slot, :, :rank]))
        return out

    _check_grads(inputs, ("A", "B", "base"), run, reference, dtype, f"embedding/{scenario.name}/{backend}/{dtype}", seed)


@pytest.mark.parametrize("scenario", [MIXED, SKEWED_90], ids=lambda s: s.name)
def test_embedding_grads_match_per_adapter_reference(scenario):
    for backend in backends_for(torch.float32):
        check_embedding_grads(scenario, backend)


def test_in_place_expand_passes_gradients_to_base_output():
    """The in-place form under autograd: base_output's earlier history gets dout, y and B theirs."""
    gen, seed = fresh_generator()
    batch = make_batch(MIXED)
    inputs = _layer_inputs(batch, (24, 8, 8), Dims(), torch.float32, gen)
    x = inputs["x"].requires_grad_()
    A, B = inputs["A"].requires_grad_(), inputs["B"].requires_grad_()
    base_weight = torch.randn(40, x.shape[1], generator=gen).to(x.device).requires_grad_()
    base_output = x @ base_weight.T
    returned = lora_ops.qkv_expand(lora_ops.sgmv_shrink(x, A, batch, 3), B, batch, base_output, 24, 8)
    assert returned is base_output
    base_output.backward(inputs["grad"])
    expected_base_weight_grad = inputs["grad"].T @ x.detach()
    torch.testing.assert_close(base_weight.grad, expected_base_weight_grad)
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in ("x", "A", "B")}
    out = lora_ops.qkv_expand(lora_ops.sgmv_shrink(leaves["x"], leaves["A"], batch, 3), leaves["B"], batch,
                              leaves["x"] @ base_weight.detach().T, 24, 8, in_place=False)
    out.backward(inputs["grad"])
    for name in ("x", "A", "B"):
        torch.testing.assert_close(inputs[name].grad, leaves[name].grad, equal_nan=True)


# ---- torch.compile of a training step ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    gen, seed = fresh_generator()
    batch = make_batch(SKEWED_90)
    widths = (24, 8, 8)
    inputs = _layer_inputs(batch, widths, Dims(), torch.float32, gen)
    ids = torch.randint(0, Dims().vocab, (batch.num_tokens,), generator=gen).to(DEVICE)
    embedding_a = torch.randn(batch.num_slots, Dims().max_rank, Dims().vocab, generator=gen).to(DEVICE)
    for name in ("A", "B"):
        inputs[name] = inputs[name].nan_to_num(0.0)

    def step(x, A, B, base, emb):
        hidden = x + lora_ops.embedding_a(ids, emb, batch, backend=backend).sum(1, keepdim=True)
        out = base.clone()
        lora_ops.qkv_expand(lora_ops.sgmv_shrink(hidden, A, batch, 3, backend=backend), B, batch, out, 24, 8,
                            backend=backend)  # the in-place form
        return (out * inputs["grad"]).sum()

    def grads(fn):
        leaves = [inputs["x"], inputs["A"], inputs["B"], inputs["base"], embedding_a]
        leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        fn(*leaves).backward()
        return [leaf.grad for leaf in leaves]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eager_grad, compiled_grad in zip(grads(step), grads(compiled)):
        torch.testing.assert_close(compiled_grad, eager_grad)


# ---- GPU ------------------------------------------------------------------------------------------

GPU_DIMS = Dims(in_features=1024, max_rank=64, q_size=1024, kv_size=256, intermediate=1536, vocab=4000)
GPU_LAYERS = [
    ("qkv", (1024, 256, 256), lambda y, B, b, base, be: lora_ops.qkv_expand(y, B, b, base, 1024, 256, backend=be, in_place=False)),
    ("gate_up", (1536, 1536), lambda y, B, b, base, be: lora_ops.gate_up_expand(y, B, b, base, backend=be, in_place=False)),
]


GPU_RANKS = (64, 8, 16, 0, 64, 32, 64, 8)
# rank 128: the kernels' two K steps, the second partly masked for rank 100
GPU_RANKS_128 = (128, 8, 100, 0, 128, 64, 16, 8)


def _gpu_scenario(num_tokens: int, skewed: bool, ranks=GPU_RANKS) -> Scenario:
    """16 sequences (so that batches of equal token counts copy into each other) over 8 slots of
    heterogeneous ranks, some without adapter; skewed: adapter 4 holds 90 % of the tokens."""
    if skewed:
        big = num_tokens * 9 // 10
        small = [(num_tokens - big) // 15] * 15
        small[0] += (num_tokens - big) % 15
        return Scenario("skewed_90", (big, *small), (4, *[(1, -1, 6)[i % 3] for i in range(15)]), ranks)
    lens = [num_tokens // 16] * 16
    lens[0] += num_tokens % 16
    return Scenario("mixed", tuple(lens), tuple(i % 9 - 1 for i in range(16)), ranks)


@requires_cuda
@pytest.mark.parametrize("skewed", [False, True], ids=["mixed", "skewed_90"])
@pytest.mark.parametrize("num_tokens", [16, 2048])
@pytest.mark.parametrize("layer", GPU_LAYERS, ids=lambda layer: layer[0])
def test_gpu_bf16_grads(layer, num_tokens, skewed, matmul_kernels):
    for backend in ("triton", "csgmv"):
        check_layer_grads(_gpu_scenario(num_tokens, skewed), layer, backend, torch.bfloat16, GPU_DIMS, "cuda")
        check_embedding_grads(_gpu_scenario(num_tokens, skewed), backend, torch.bfloat16, GPU_DIMS, "cuda")


@requires_cuda
@pytest.mark.parametrize("layer", GPU_LAYERS, ids=lambda layer: layer[0])
def test_gpu_bf16_grads_at_rank_128(layer, matmul_kernels):
    dims = dataclasses.replace(GPU_DIMS, max_rank=128)
    for backend in ("triton", "csgmv"):
        check_layer_grads(_gpu_scenario(2048, False, GPU_RANKS_128), layer, backend, torch.bfloat16, dims, "cuda")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "csgmv"])
def test_gpu_training_step_in_a_cuda_graph(backend):
    """Capture forward + backward + an optimizer step once; replay with new tokens and batches."""
    gen, seed = fresh_generator()
    dims, widths = GPU_DIMS, (1024, 256, 256)
    static_batch = make_batch(_gpu_scenario(512, skewed=False), device="cuda")
    inputs = _layer_inputs(static_batch, widths, dims, torch.bfloat16, gen)
    A = torch.nn.Parameter(inputs["A"].nan_to_num(0.0))
    B = torch.nn.Parameter(inputs["B"].nan_to_num(0.0))
    static_x, static_base, static_grad = inputs["x"], inputs["base"], inputs["grad"]
    optimizer = torch.optim.SGD([A, B], lr=0.1)

    def step():
        optimizer.zero_grad(set_to_none=False)
        y = lora_ops.sgmv_shrink(static_x, A, static_batch, 3, backend=backend)
        out = lora_ops.qkv_expand(y, B, static_batch, static_base, 1024, 256, backend=backend, in_place=False)
        out.backward(static_grad)
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels, allocate the grads
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for scenario in (_gpu_scenario(512, skewed=True), _gpu_scenario(512, skewed=False)):
        batch = make_batch(scenario, device="cuda")
        new = _layer_inputs(batch, widths, dims, torch.bfloat16, gen)
        static_batch.copy_(batch)
        for static, value in ((static_x, new["x"]), (static_base, new["base"]), (static_grad, new["grad"])):
            static.copy_(value)
        expected = {}
        for name, param in (("A", A), ("B", B)):
            expected[name] = param.detach().clone()
        reference = dict(x=static_x, A=A.detach(), B=B.detach(), base=static_base, grad=static_grad)
        ref64 = _reference_grads(reference, ("A", "B"), lambda A, B: _reference_layer(
            static_x.double(), A, B, static_base.double(), batch, widths), torch.float64)
        ref_lowp = _reference_grads(reference, ("A", "B"), lambda A, B: _reference_layer(
            static_x, A, B, static_base, batch, widths), torch.bfloat16)
        graph.replay()
        torch.cuda.synchronize()
        for name, param in (("A", A), ("B", B)):
            assert_close_to_reference(param.grad, ref64[name], ref_lowp[name], f"graph/{scenario.name}/d{name}", seed)
            # the captured SGD step: the optimizer's own arithmetic on the replayed gradient
            torch.testing.assert_close(param.detach(), expected[name].add(param.grad, alpha=-0.1))
