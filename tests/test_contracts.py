"""The op surface: schemas as registered, opcheck on every op and backend, fake shapes."""

import pytest
import torch

import lora_ops
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import DEVICE, OP_CASES, SCENARIOS, Dims, backends_for, fresh_generator, make_batch

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


class _RecordOpCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lora":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_opcheck(op_case, backend):
    """torch.library.opcheck with its default utilities, on the exact op call the API makes."""
    scenario = SCENARIOS[0]
    gen, _ = fresh_generator()
    batch = make_batch(scenario)
    inputs = op_case.build(batch, Dims(), torch.float32, gen)
    with _RecordOpCalls() as recorder:
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
    with _RecordOpCalls() as recorder:
        real = op_case.run(inputs, batch, "torch_native")
    op, args, kwargs = recorder.calls[0]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args, **kwargs)
    if fake is None:  # in-place expand: the fake returns nothing, like the real op
        assert op._schema.returns == []
    else:
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
