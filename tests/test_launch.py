"""The cached launch (``csrc_triton.common.CachedLaunch``): its key separates every argument
property Triton compiles a different kernel for, and launches through it give the results
``JITFunction.run`` would, also for inputs that differ from the first call's only in alignment,
row stride or dtype."""

import pytest
import torch

from conftest import (
    HAS_TRITON, OP_CASES, SCENARIOS, Dims, assert_close_to_reference, fresh_generator, make_batch,
    requires_cuda,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _key(*args):
    from csrc_triton.common import _specialization_key
    return _specialization_key(args)


def test_the_key_separates_what_triton_specializes_integers_on():
    keys = {value: _key(value) for value in (1, 2, 16, 17, 32, 2**31 - 16, 2**31, -16)}
    assert keys[16] == keys[32] == keys[2**31 - 16] == keys[-16]  # multiples of 16 in int32
    assert keys[2] == keys[17]  # neither 1 nor a multiple of 16
    assert len({keys[1], keys[2], keys[16], keys[2**31]}) == 4  # 1, plain, multiple of 16, i64
    assert _key(True) is None and _key(0.5) is None  # not an int or tensor: Triton decides


def test_the_key_separates_dtypes_and_refuses_unaligned_pointers():
    buffer = torch.zeros(64, dtype=torch.bfloat16)
    assert _key(buffer[:8]) == _key(buffer[8:16])  # both 16-byte aligned
    assert _key(buffer[:8]) != _key(buffer[:8].view(torch.float16))
    assert _key(buffer[1:9]) is None  # 2 bytes past alignment: left to JITFunction.run
    assert _key(buffer[:8], 16, buffer[1:9]) is None


def test_launch_hooks_are_seen_in_either_form():
    from csrc_triton.common import _has_launch_hook
    from triton.knobs import HookChain

    chain = HookChain()
    assert not _has_launch_hook(None) and not _has_launch_hook(chain)  # Triton >= 3.5: an empty chain
    chain.add(print)
    assert _has_launch_hook(chain) and _has_launch_hook(print)


class _FakeKernel:
    """Stands in for a JITFunction (CPU): records what ``kernel[grid](...)`` and the compiled
    kernel's ``run`` receive. Signature: (x, n, BLOCK: constexpr, EVEN: constexpr = True)."""

    class Param:
        def __init__(self, name, is_constexpr, default=None):
            self.name, self.is_constexpr, self.default = name, is_constexpr, default

    params = [Param("x", False), Param("n", False), Param("BLOCK", True), Param("EVEN", True, True)]
    pre_run_hooks = []

    def __init__(self):
        self.jit_calls, self.runs = [], []
        kernel = self

        class Compiled:
            function, packed_metadata = "function", "packed_metadata"

            def run(self, *args):
                kernel.runs.append(args)

        self.compiled = Compiled()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.jit_calls.append((grid, args, kwargs)) or self.compiled


@pytest.fixture
def fake_launch(monkeypatch):
    from csrc_triton import common

    monkeypatch.setattr(common, "JITFunction", _FakeKernel)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    kernel = _FakeKernel()
    return kernel, common.CachedLaunch(kernel)


def test_a_repeated_launch_runs_the_compiled_kernel_with_every_parameter_in_order(fake_launch):
    kernel, launch = fake_launch
    x = torch.zeros(8)
    launch[(5,)](x, 32, BLOCK=64, num_warps=4)  # miss: JITFunction.run compiles and launches
    assert len(kernel.jit_calls) == 1 and not kernel.runs
    launch[(7,)](x, 48, BLOCK=64, num_warps=4)  # hit: same specialization
    assert len(kernel.jit_calls) == 1
    assert kernel.runs == [(7, 1, 1, 1234, "function", "packed_metadata", None, None, None, x, 48, 64, True)]


@pytest.mark.parametrize("change", ["integer class", "dtype", "constexpr", "launch option", "unaligned"])
def test_a_launch_that_triton_would_specialize_differently_goes_through_jitfunction_run(fake_launch, change):
    kernel, launch = fake_launch
    x = torch.zeros(16)
    launch[(1,)](x, 32, BLOCK=64, num_warps=4)
    args, kwargs = {
        "integer class": ((x, 33), dict(BLOCK=64, num_warps=4)),
        "dtype": ((x.double(), 32), dict(BLOCK=64, num_warps=4)),
        "constexpr": ((x, 32), dict(BLOCK=128, num_warps=4)),
        "launch option": ((x, 32), dict(BLOCK=64, num_warps=8)),
        "unaligned": ((x[1:], 32), dict(BLOCK=64, num_warps=4)),
    }[change]
    launch[(1,)](*args, **kwargs)
    assert len(kernel.jit_calls) == 2 and not kernel.runs


def _set_launch_enter_hook(monkeypatch, hook) -> None:
    """Sets a Triton launch-enter hook until the test ends: Triton >= 3.5 keeps a HookChain
    (empty by default), earlier versions None or a function."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "calls"):
        monkeypatch.setattr(chain, "calls", [hook])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)


@pytest.mark.parametrize("feature", ["launch hook", "pre-run hook", "debug build", "instrumentation"])
def test_per_call_work_of_jitfunction_run_sends_every_launch_through_it(fake_launch, monkeypatch, feature):
    from triton import knobs

    kernel, launch = fake_launch
    x = torch.zeros(8)
    launch[(1,)](x, 32, BLOCK=64)
    if feature == "launch hook":
        _set_launch_enter_hook(monkeypatch, print)
    elif feature == "pre-run hook":
        monkeypatch.setattr(kernel, "pre_run_hooks", [print])
    elif feature == "debug build":
        monkeypatch.setattr(knobs.runtime, "debug", True)
    else:
        monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "consan")
    launch[(1,)](x, 32, BLOCK=64)
    assert len(kernel.jit_calls) == 2 and not kernel.runs


def _relaid(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of ``tensor`` in the given memory layout (same values)."""
    if layout == "unaligned":  # 2+ bytes past a 16-byte boundary, still contiguous
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
        out = storage[1:].view(tensor.shape)
    else:  # "odd row stride": the last dimension padded by one element
        padded = torch.empty(*tensor.shape[:-1], tensor.shape[-1] + 1, dtype=tensor.dtype, device=tensor.device)
        out = padded[..., :tensor.shape[-1]]
    out.copy_(tensor)
    return out


def _relaid_inputs(inputs: dict, layout: str) -> dict:
    """Unaligned: every tensor; odd row stride: the floating tensors of two or more dimensions."""
    return {name: _relaid(value, layout)
            if isinstance(value, torch.Tensor) and (layout == "unaligned" or value.is_floating_point() and value.dim() >= 2)
            else value
            for name, value in inputs.items()}


@requires_cuda
@pytest.mark.parametrize("op_case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", ["triton", "csgmv"])
def test_launches_after_the_first_respecialize(op_case, backend, matmul_kernels):
    """One op in one process: aligned bfloat16 first (its kernels cached), then unaligned
    tensors, odd row strides, float16 and bfloat16 again; every output against the float64
    reference."""
    gen, seed = fresh_generator()
    batch = make_batch(SCENARIOS[0], device="cuda")
    for dtype, layout in [(torch.bfloat16, None), (torch.bfloat16, "unaligned"), (torch.bfloat16, "odd row stride"),
                          (torch.float16, None), (torch.bfloat16, None)]:
        inputs = op_case.build(batch, Dims(), dtype, gen)
        if layout is not None:
            inputs = _relaid_inputs(inputs, layout)
        ref64, ref_low = op_case.reference(inputs, batch, torch.float64), op_case.reference(inputs, batch, dtype)
        if "base" in inputs:  # the expand as a model calls it: into the relaid base, in place
            op_case.run_in_place(inputs, batch, backend)
            out = inputs["base"]
        else:
            out = op_case.run(inputs, batch, backend)
        assert_close_to_reference(out, ref64, ref_low, f"{op_case.name} {dtype} {layout or 'aligned'}", seed)


@requires_cuda
@pytest.mark.parametrize("feature", ["launch hook", "pre-run hook", "debug build"])
def test_what_jitfunction_run_does_per_call_still_happens(feature, monkeypatch):
    """With a launch hook (a profiler), a kernel pre-run hook or a debug build switched on after
    the kernels were cached, launches go through JITFunction.run again, and hooks see them."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    from csrc_triton import shrink

    case = OP_CASES[2]
    gen, seed = fresh_generator()
    batch = make_batch(SCENARIOS[0], device="cuda")
    inputs = case.build(batch, Dims(), torch.bfloat16, gen)
    case.run(inputs, batch, "triton")  # cached
    runs, seen = [], []
    jit_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(self) or jit_run(self, *a, **k))
    if feature == "launch hook":
        _set_launch_enter_hook(monkeypatch, seen.append)
    elif feature == "pre-run hook":
        for launcher in (shrink._shrink_per_token_kernel, shrink._shrink_chunk_kernel):
            monkeypatch.setattr(launcher.kernel, "pre_run_hooks", [lambda *args, **kwargs: seen.append(args)])
    else:
        monkeypatch.setattr(knobs.runtime, "debug", True)
    out = case.run(inputs, batch, "triton")
    monkeypatch.undo()
    assert len(runs) == 1 and len(seen) == (0 if feature == "debug build" else 1)
    assert_close_to_reference(out, case.reference(inputs, batch, torch.float64),
                              case.reference(inputs, batch, torch.bfloat16), f"shrink with a {feature}", seed)


@requires_cuda
def test_launches_after_the_first_take_the_cached_path():
    """Without hooks a repeated launch is a cache hit (were the cache never filled, the host
    saving would be lost without a sign, as it was while Triton's empty hook chains counted as
    hooks)."""
    from csrc_triton import shrink

    case = OP_CASES[2]
    gen, _ = fresh_generator()
    batch = make_batch(SCENARIOS[0], device="cuda")
    inputs = case.build(batch, Dims(), torch.bfloat16, gen)
    case.run(inputs, batch, "triton")
    case.run(inputs, batch, "triton")
    assert shrink._shrink_per_token_kernel.compiled or shrink._shrink_chunk_kernel.compiled
