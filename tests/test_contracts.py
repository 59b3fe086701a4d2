"""The op surface: schemas as registered, opcheck on every op and backend, fake shapes."""

import pytest
import torch

import lora_ops
from lora_ops.testing import OP_CASES_BY_NAME, RecordLoraCalls
from conftest import OP_CASES, SCENARIOS, Dims, backends_for, fresh_generator, make_batch

EXPECTED_OPS = ["sgmv_shrink", "sgmv_expand", "qkv_expand", "gate_up_expand", "embedding_a"]


def test_every_op_is_registered_with_its_schema():
    for name in EXPECTED_OPS:
        schema = getattr(torch.ops.lora, name).default._schema
        assert str(schema) == f"lora::{lora_ops.SCHEMAS[name]}"
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.lora, name).default.tags


def test_expand_ops_declare_in_place_accumulation():
    for name in ["sgmv_expand", "qkv_expand", "gate_up_expand"]:
        schema = getattr(torch.ops.lora, name).default._schema
        base = schema.arguments[0]
        assert base.name == "base_output" and base.alias_info.is_write
        assert not schema.returns


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_opcheck(op_case, backend):
    """torch.library.opcheck with its default utilities, on the exact op call the API makes."""
    scenario = SCENARIOS[0]
    gen, _ = fresh_generator()
    batch = make_batch(scenario)
    inputs = op_case.build(batch, Dims(), torch.float32, gen)
    with RecordLoraCalls() as recorder:
        op_case.run(inputs, batch, backend)
    assert len(recorder.calls) == 1
    op, args, kwargs = recorder.calls[0]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_fake_matches_real(op_case):
    """Fake impls give the real output's shape, dtype and strides under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen, _ = fresh_generator()
    batch = make_batch(SCENARIOS[0])
    inputs = op_case.build(batch, Dims(), torch.float16, gen)
    with RecordLoraCalls() as recorder:
        real = op_case.run(inputs, batch, "torch_native")
    op, args, kwargs = recorder.calls[0]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args, **kwargs)
    if fake is None:  # in-place expand: the fake returns nothing, like the real op
        assert op._schema.returns == []
    else:
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def _recorded_call(op_case, backend, dtype=torch.float32):
    gen, _ = fresh_generator()
    batch = make_batch(SCENARIOS[0])
    inputs = op_case.build(batch, Dims(), dtype, gen)
    with RecordLoraCalls() as recorder:
        op_case.run(inputs, batch, backend)
    return recorder.calls[0]


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_functions_run_the_differentiable_twin_only_under_autograd(op_case, backend):
    """Inputs that require grad (grad mode on): the function calls lora::*_autograd; otherwise,
    or under no_grad, the inference op (no autograd kernel on the inference path)."""
    gen, _ = fresh_generator()
    batch = make_batch(SCENARIOS[0])
    inputs = op_case.build(batch, Dims(), torch.float32, gen)
    for grad_mode, requires_grad, twin in [(True, False, False), (True, True, True), (False, True, False)]:
        for value in inputs.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_mode), RecordLoraCalls() as recorder:
            op_case.run(inputs, batch, backend)
        (op, _, _), = recorder.calls
        assert op.name().endswith("_autograd") == twin, (grad_mode, requires_grad, op.name())


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
def test_inference_ops_refuse_inputs_that_require_grad(op_case):
    """Called directly with inputs that require grad, an inference op (no backward) raises and
    names the way to gradients, rather than return silently zero ones."""
    op, args, kwargs = _recorded_call(op_case, "torch_native")
    float_inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    and a.dim() >= 2]
    for i in float_inputs:
        grad_args = list(args)
        grad_args[i] = args[i].clone().requires_grad_()
        if op._schema.arguments[i].alias_info is not None:  # in-place base output: a non-leaf
            grad_args[i] = grad_args[i] * 1
        with pytest.raises(lora_ops.LoRAArgumentError, match=r"requires grad, but lora::\w+ has no backward; call lora_ops"):
            op(*grad_args, **kwargs)
        with torch.no_grad():
            op(*grad_args, **kwargs)  # fine without grad mode


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_direct_eager_calls_equal_the_op(op_case, backend, monkeypatch):
    """In plain eager the Python functions run the kernels without the dispatcher; under any
    dispatch mode they call the op. Both give bit-identical results."""
    gen, _ = fresh_generator()
    batch = make_batch(SCENARIOS[0])
    inputs = op_case.build(batch, Dims(), torch.float32, gen)
    with RecordLoraCalls() as recorder:
        through_op = op_case.run(inputs, batch, backend)
    assert len(recorder.calls) == 1
    monkeypatch.setattr(torch.ops, "lora", None)  # a direct call must not reach torch.ops.lora
    direct = op_case.run(inputs, batch, backend)
    monkeypatch.undo()
    assert torch.equal(direct, through_op)


@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_direct_in_place_expand_is_visible_to_autograd(backend):
    """The direct in-place expand bumps base_output's version, as the op's ``Tensor(a!)`` does:
    a tensor saved for a backward and then changed by the expand fails that backward."""
    batch = make_batch(SCENARIOS[0])
    gen, _ = fresh_generator()
    inputs = OP_CASES_BY_NAME["sgmv_expand"].build(batch, Dims(), torch.float32, gen)
    base = inputs["base"].clone()
    scale = torch.ones(1, device=base.device, requires_grad=True)
    product = base * scale  # saves base for scale's gradient
    version = base._version
    lora_ops.sgmv_expand(inputs["y"], inputs["B"], batch, base, inputs["offsets"], backend=backend)
    assert base._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()


def test_inference_op_refuses_requires_grad_under_compile():
    op, args, kwargs = _recorded_call(OP_CASES[0], "torch_native")
    x = args[0].clone().requires_grad_()
    compiled = torch.compile(lambda x: op(x, *args[1:], **kwargs), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"requires grad, but lora::sgmv_shrink has no backward"):
        compiled(x)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fakes_reject_wrong_shapes_while_tracing(dynamic):
    """The fake runs the op's argument check, so torch.compile fails at trace time with the same
    message as eager, before any kernel runs."""
    torch._dynamo.reset()
    op, args, kwargs = _recorded_call(OP_CASES[0], "torch_native")  # shrink, 1 slice
    x, weights = args[0], args[1]
    cases = [
        ((x[:, :-1].contiguous(), weights), r"weights.shape\[2\] \(in features\) must match x.shape\[1\]"),
        ((x[:-1].contiguous(), weights), r"x.shape\[0\] \(tokens\) must match the batch's token count"),
        ((x.double(), weights.double()), r"x must have dtype float16, bfloat16, float32"),
    ]
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    for (bad_x, bad_weights), message in cases:
        compiled = torch.compile(lambda a, b: op(a, b, *args[2:], **kwargs), backend=record,
                                 fullgraph=True, dynamic=dynamic)
        with pytest.raises(Exception, match=message):
            compiled(bad_x, bad_weights)
    assert graphs == [], "a wrong shape got past tracing"
