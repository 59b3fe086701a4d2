"""The resolver: which backend, plan and kernel family run each op, and the reason it gives.

The rules read only device, dtype and sizes, so they are tested here without a GPU: the
weights are stand-ins that carry a device, a dtype and a shape.
"""

from types import SimpleNamespace

import pytest
import torch

import lora_ops
from lora_ops import ops
from lora_ops.testing import RecordLoraCalls
from conftest import DEVICE, HAS_TRITON

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
MATMUL_OPS = ["sgmv_shrink", "sgmv_expand", "qkv_expand", "gate_up_expand"]


def weights(device=CUDA, dtype=torch.bfloat16, shape=(2, 48, 4096)):
    return SimpleNamespace(device=device, dtype=dtype, shape=shape)


def one_token_sequences(n, slots=2):
    return lora_ops.LoRABatch.build([1] * n, [i % slots for i in range(n)], [16] * slots, [1.0] * slots)


def long_sequences(n_seqs=2, length=300):
    return lora_ops.LoRABatch.build([length] * n_seqs, list(range(n_seqs)), [16] * n_seqs, [1.0] * n_seqs)


pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the CUDA rules need triton installed")


def test_auto_on_cpu_is_torch_native_and_says_why():
    decision = lora_ops.explain("sgmv_shrink", long_sequences(), weights(CPU, torch.float32))
    assert (decision.backend, decision.plan, decision.kernel) == ("torch_native", None, "torch")
    assert "not on a GPU" in decision.reason
    assert str(decision).startswith("sgmv_shrink: torch_native, torch kernel -- auto:")


def test_auto_sorts_interleaved_decode_and_keeps_token_order_for_long_segments():
    decode = lora_ops.explain("sgmv_expand", one_token_sequences(64), weights(shape=(2, 4096, 16)))
    assert (decode.backend, decode.plan) == ("csgmv", "sorted")
    assert "sorting by adapter needs fewer chunks (4 chunks sorted by adapter, 64 in token order)" in decode.reason
    prefill = lora_ops.explain("sgmv_expand", long_sequences(), weights(shape=(2, 4096, 16)))
    assert (prefill.backend, prefill.plan, prefill.kernel) == ("triton", "segment", "chunk")
    assert "no permutation" in prefill.reason


@pytest.mark.parametrize("op", MATMUL_OPS)
def test_small_batches_and_one_token_segments_take_the_per_token_kernels(op):
    few = lora_ops.explain(op, one_token_sequences(4), weights())
    assert few.kernel == "per_token"
    segments = lora_ops.explain(op, one_token_sequences(64), weights(), backend="triton")
    assert (segments.plan, segments.kernel) == ("segment", "per_token")
    assert "as many chunks (64) as tokens (64)" in segments.reason
    prefill = lora_ops.explain(op, long_sequences(), weights(), backend="csgmv")
    assert (prefill.plan, prefill.kernel) == ("sorted", "chunk")


def test_size_thresholds_of_the_kernel_families():
    batch = one_token_sequences(32)  # sorted plan: 2 chunks for 32 tokens
    assert lora_ops.explain("sgmv_shrink", batch, weights(shape=(2, 128, 64))).kernel == "per_token"  # 4096 outputs
    over = lora_ops.explain("sgmv_shrink", batch, weights(shape=(2, 129, 64)))
    assert over.kernel == "chunk" and "4128 outputs > 4096" in over.reason
    assert lora_ops.explain("sgmv_expand", one_token_sequences(16), weights()).kernel == "per_token"
    assert lora_ops.explain("sgmv_expand", one_token_sequences(17), weights()).kernel == "chunk"


def test_embedding_has_one_kernel():
    decision = lora_ops.explain("embedding_a", long_sequences(), weights(shape=(2, 16, 1000)), backend="csgmv")
    assert (decision.backend, decision.kernel) == ("csgmv", "gather")


def test_the_python_functions_run_what_explain_says(monkeypatch):
    batch = lora_ops.LoRABatch.build([3, 2], [0, 1], [4, 4], [1.0, 1.0], device=DEVICE)
    x, A = torch.randn(5, 8, device=DEVICE), torch.randn(2, 8, 8, device=DEVICE)
    ran = []  # (backend, kernel) of every shrink whose kernels ran, directly or through the op
    real = ops._shrink_kernels
    monkeypatch.setattr(ops, "_shrink_kernels", lambda *args: ran.append(args[-2:]) or real(*args))
    for backend in ("torch_native", "triton", "csgmv"):
        decision = lora_ops.explain("sgmv_shrink", batch, A, backend=backend)
        lora_ops.sgmv_shrink(x, A, batch, 2, backend=backend)  # plain eager: the kernels directly
        with RecordLoraCalls() as recorder:  # a dispatch mode sees the op
            lora_ops.sgmv_shrink(x, A, batch, 2, backend=backend)
        (_, op_args, _), = recorder.calls
        assert ran[-2:] == [(decision.backend, decision.kernel)] * 2 and op_args[-2:] == ran[-1]


def test_unknown_names_and_unfit_tensors_are_refused():
    batch = long_sequences()
    with pytest.raises(lora_ops.BackendError, match=r"unknown backend 'fast'; choices: torch_native, triton, csgmv, 'auto'"):
        lora_ops.explain("sgmv_shrink", batch, weights(), backend="fast")
    with pytest.raises(lora_ops.BackendError, match=r"unknown op 'shrink'; choices: sgmv_shrink"):
        lora_ops.explain("shrink", batch, weights())
    with pytest.raises(lora_ops.BackendError) as info:
        lora_ops.explain("sgmv_shrink", batch, weights(dtype=torch.float64))
    assert str(info.value).splitlines() == [
        "backend 'csgmv' cannot run torch.float64 tensors on cuda; the choices:" if batch.prefers_adapter_sorting
        else "backend 'triton' cannot run torch.float64 tensors on cuda; the choices:",
        "  torch_native: rejected, dtype torch.float64 not supported (expects one of float16, bfloat16, float32)",
        "  triton: rejected, dtype torch.float64 not supported (expects one of float16, bfloat16, float32)",
        "  csgmv: rejected, dtype torch.float64 not supported (expects one of float16, bfloat16, float32)",
    ]


def test_use_backend_sets_the_default_for_a_block():
    batch, w = long_sequences(), weights()
    auto = lora_ops.resolve("sgmv_shrink", batch, w, "auto")
    assert lora_ops.resolve("sgmv_shrink", batch, w) == auto
    with lora_ops.use_backend("csgmv"):
        assert lora_ops.resolve("sgmv_shrink", batch, w).backend == "csgmv"
        assert lora_ops.resolve("sgmv_shrink", batch, w, "auto") == auto
    assert lora_ops.resolve("sgmv_shrink", batch, w) == auto
    with pytest.raises(lora_ops.BackendError, match="unknown backend 'fast'"):
        with lora_ops.use_backend("fast"):
            pass


def test_auto_of_a_fixed_capacity_batch_is_decided_by_its_sizes_whatever_its_contents():
    """A graph or compiled function runs what auto decided at capture; both backends are exact,
    so contents where a per-step batch would sort the other way still get a right answer."""
    decode = lora_ops.LoRABatch.empty(64, [16, 16], [1.0, 1.0])  # any ids: up to 64 sequences
    prefill = lora_ops.LoRABatch.empty(600, [16, 16], [1.0, 1.0], max_seqs=2)
    w = weights(shape=(2, 4096, 16))
    for contents in [([64], [0]), ([1] * 64, [i % 2 for i in range(64)])]:
        decode.update_(*contents)
        decision = lora_ops.explain("sgmv_expand", decode, w)
        assert decision.backend == "csgmv"
        assert "fixed-capacity batch, decided by its sizes: at most 7 chunks sorted by adapter, 64 in token order" in decision.reason
    assert lora_ops.LoRABatch.build([64], [0], [16, 16], [1.0, 1.0]).prefers_adapter_sorting is False
    for contents in [([300, 300], [0, 1]), ([1, 1], [0, 1])]:
        prefill.update_(*contents)
        assert lora_ops.resolve("sgmv_expand", prefill, w).backend == "triton"
