"""Bad input gets a clear error naming the argument and what was expected."""

import pytest
import torch

import lora_ops
from conftest import DEVICE, Scenario, make_batch

D = DEVICE
SCENARIO = Scenario("bad", (3, 2), (0, 1), (8, 4))


@pytest.fixture
def batch():
    return make_batch(SCENARIO)


def shrink_args(**overrides):
    args = {"x": torch.randn(5, 16, device=D), "weights": torch.randn(2, 16, 16, device=D), "num_slices": 2}
    args.update(overrides)
    return args


def expand_args(**overrides):
    args = {"y": torch.randn(5, 16, device=D), "weights": torch.randn(2, 20, 8, device=D),
            "base_output": torch.randn(5, 20, device=D), "slice_offsets": [0, 12, 20]}
    args.update(overrides)
    return args


SHRINK_CASES = [
    ({"x": torch.randn(5, 16, device=D, dtype=torch.float64)}, r"x must have dtype float16, bfloat16, float32, got torch.float64"),
    ({"x": torch.randn(5, 16, device=D).half()}, r"weights must have the dtype of x \(torch.float16\), got torch.float32"),
    ({"x": torch.randn(5, 16, 2, device=D)}, r"x must be 2-D, got shape \(5, 16, 2\)"),
    ({"x": torch.randn(16, 5, device=D).T}, r"x must be contiguous in its last dimension"),
    ({"x": torch.randn(4, 16, device=D)}, r"x.shape\[0\] \(tokens\) must match the batch's token count: expected 5, got 4"),
    ({"weights": torch.randn(3, 16, 16, device=D)}, r"weights.shape\[0\] \(adapter slots\) must match the batch's slots: expected 2, got 3"),
    ({"weights": torch.randn(2, 16, 8, device=D)}, r"weights.shape\[2\] \(in features\) must match x.shape\[1\]: expected 16, got 8"),
    ({"weights": torch.randn(2, 8, 16, device=D)}, r"adapter rank 8 exceeds the weights' max rank R=4"),
    ({"num_slices": 3}, r"num_slices must be an int in \[1, 3\] dividing weights.shape\[1\] = 16, got 3"),
    ({"num_slices": 0}, r"num_slices must be an int in \[1, 3\]"),
    ({"num_slices": 4, "weights": torch.randn(2, 16, 16, device=D)}, r"num_slices must be an int in \[1, 3\]"),
    ({"weights": [[1.0]]}, r"weights must be a torch.Tensor, got list"),
    ({"weights": torch.randn(2, 16, 16, device=D).transpose(1, 2)}, r"weights must be contiguous in its last dimension"),
    ({"weights": torch.randn(16, 16, device=D)}, r"weights must be 3-D, got shape \(16, 16\)"),
    ({"num_slices": 2.0}, r"num_slices must be an int in \[1, 3\]"),
]


@pytest.mark.parametrize("overrides,message", SHRINK_CASES)
def test_shrink_rejects(batch, overrides, message):
    args = shrink_args(**overrides)
    with pytest.raises(lora_ops.LoRAArgumentError, match=f"^sgmv_shrink: {message}"):
        lora_ops.sgmv_shrink(args["x"], args["weights"], batch, num_slices=args["num_slices"])


EXPAND_CASES = [
    ({"slice_offsets": [0, 12, 21]}, r"slice_offsets must end at base_output.shape\[1\] = 20, got \[0, 12, 21\]"),
    ({"slice_offsets": [0, 12, 12, 20]}, r"slice_offsets must be strictly increasing"),
    ({"slice_offsets": [2, 20]}, r"slice_offsets must start at 0"),
    ({"slice_offsets": [0, 4, 8, 12, 20]}, r"slice_offsets may describe at most 3 slices \(q/k/v\), got 4"),
    ({"y": torch.randn(5, 24, device=D)}, r"y.shape\[1\] must be 2 slices x weights.shape\[2\] \(R\): expected 16, got 24"),
    ({"y": torch.randn(4, 16, device=D)}, r"y.shape\[0\] \(tokens\) must match base_output.shape\[0\]: expected 5, got 4"),
    ({"weights": torch.randn(2, 20, 4, device=D), "y": torch.randn(5, 8, device=D)}, r"adapter rank 8 exceeds the weights' max rank R=4"),
    ({"weights": torch.randn(2, 18, 8, device=D)}, r"weights.shape\[1\] \(out features\) must match base_output.shape\[1\]: expected 20, got 18"),
    ({"base_output": torch.randn(5, 20, device=D).half()}, r"y must have the dtype of base_output \(torch.float16\), got torch.float32"),
    ({"base_output": torch.randn(20, 5, device=D).T}, r"base_output must be contiguous in its last dimension"),
    ({"base_output": torch.randn(20, device=D)}, r"base_output must be 2-D, got shape \(20,\)"),
    ({"y": torch.randn(16, 5, device=D).T}, r"y must be contiguous in its last dimension"),
    ({"y": torch.randn(5, 16, 1, device=D)}, r"y must be 2-D"),
    ({"y": torch.randn(5, 16, device=D).half()}, r"y must have the dtype of base_output \(torch.float32\), got torch.float16"),
    ({"weights": torch.randn(2, 20, 8, device=D).half()}, r"weights must have the dtype of base_output \(torch.float32\), got torch.float16"),
    ({"weights": torch.randn(2, 8, 20, device=D).transpose(1, 2)}, r"weights must be contiguous in its last dimension"),
    ({"weights": torch.randn(3, 20, 8, device=D)}, r"weights.shape\[0\] \(adapter slots\) must match the batch's slots: expected 2, got 3"),
    ({"base_output": torch.randn(4, 20, device=D), "y": torch.randn(4, 16, device=D)},
     r"base_output.shape\[0\] \(tokens\) must match the batch's token count: expected 5, got 4"),
]


@pytest.mark.parametrize("overrides,message", EXPAND_CASES)
def test_expand_rejects(batch, overrides, message):
    args = expand_args(**overrides)
    with pytest.raises(lora_ops.LoRAArgumentError, match=f"^sgmv_expand: {message}"):
        lora_ops.sgmv_expand(args["y"], args["weights"], batch, args["base_output"], args["slice_offsets"])


def test_qkv_and_gate_up_reject_sizes_that_do_not_fit(batch):
    y, B, base = torch.randn(5, 24, device=D), torch.randn(2, 20, 8, device=D), torch.randn(5, 20, device=D)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^qkv_expand: q_size \+ 2\*kv_size must equal base_output.shape\[1\] = 20"):
        lora_ops.qkv_expand(y, B, batch, base, 12, 5)
    base_odd, B_odd = torch.randn(5, 21, device=D), torch.randn(2, 21, 8, device=D)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^gate_up_expand: base_output.shape\[1\] must be even"):
        lora_ops.gate_up_expand(torch.randn(5, 16, device=D), B_odd, batch, base_odd)


def test_embedding_rejects(batch):
    A = torch.randn(2, 8, 50, device=D)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: token_ids must lie in \[0, 50\) \(weights.shape\[2\]\), got \[50\]"):
        lora_ops.embedding_a(torch.tensor([1, 2, 50, 3, 4], device=D), A, batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: token_ids must have dtype int32, int64, got torch.float32"):
        lora_ops.embedding_a(torch.zeros(5, device=D), A, batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: adapter rank 8 exceeds the weights' max rank R=4"):
        lora_ops.embedding_a(torch.arange(5, device=D), torch.randn(2, 4, 50, device=D), batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: token_ids.shape\[0\] \(tokens\) must match the batch's token count: expected 5, got 4"):
        lora_ops.embedding_a(torch.arange(4, device=D), A, batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: weights.shape\[0\] \(adapter slots\) must match the batch's slots: expected 2, got 3"):
        lora_ops.embedding_a(torch.arange(5, device=D), torch.randn(3, 8, 50, device=D), batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: token_ids must be contiguous in its last dimension"):
        lora_ops.embedding_a(torch.arange(10, device=D)[::2], A, batch)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: weights must have dtype float16, bfloat16, float32, got torch.float64"):
        lora_ops.embedding_a(torch.arange(5, device=D), A.double(), batch)


def test_x_that_is_not_a_tensor_is_named(batch):
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Tensor' for argument 'x'"):
        lora_ops.sgmv_shrink([[1.0]], torch.randn(2, 16, 16, device=D), batch, 2)


def test_batch_on_another_device_is_rejected():
    batch = lora_ops.LoRABatch.build([2], [0], [4], [1.0], device="meta")
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^sgmv_shrink: batch metadata \(token_adapter\) is on meta but x is on cpu"):
        lora_ops.sgmv_shrink(torch.randn(2, 8), torch.randn(1, 4, 8), batch)


BATCH_CASES = [
    (dict(seq_lens=[2, -1], adapter_ids=[0, 0]), r"seq_lens must be non-negative"),
    (dict(seq_lens=[2, 1], adapter_ids=[0]), r"seq_lens and adapter_ids must have one entry per sequence, got 2 and 1"),
    (dict(seq_lens=[2], adapter_ids=[2]), r"adapter ids must be -1 \(no adapter\) or a slot in \[0, 2\), got \[2\]"),
    (dict(seq_lens=[2], adapter_ids=[-2]), r"adapter ids must be -1 \(no adapter\) or a slot in \[0, 2\), got \[-2\]"),
    (dict(ranks=[4, -1]), r"ranks must be non-negative"),
    (dict(scalings=[1.0]), r"scalings must have one entry per adapter slot \(2\), got 1"),
    (dict(scalings=[1.0, float("nan")]), r"scalings must be finite"),
    (dict(seq_lens=[1.5]), r"seq_lens must hold integers, got torch.float32"),
    (dict(chunk_size=24), r"chunk_size must be one of 16, 32, 64, 128, got 24"),
]


@pytest.mark.parametrize("overrides,message", BATCH_CASES)
def test_batch_validation(overrides, message):
    args = dict(seq_lens=[2, 3], adapter_ids=[0, -1], ranks=[4, 8], scalings=[1.0, 0.5], chunk_size=None)
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        lora_ops.LoRABatch.build(args["seq_lens"], args["adapter_ids"], args["ranks"], args["scalings"], chunk_size=args["chunk_size"])


def test_unknown_and_unavailable_backends_list_every_choice(batch, monkeypatch):
    x, A = torch.randn(5, 16, device=D), torch.randn(2, 16, 16, device=D)
    with pytest.raises(lora_ops.BackendError, match=r"unknown backend 'cuda'; choices: torch_native, triton, csgmv, 'auto'"):
        lora_ops.sgmv_shrink(x, A, batch, 2, backend="cuda")
    if D == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(lora_ops.BackendError) as info:
            lora_ops.sgmv_shrink(x, A, batch, 2, backend="csgmv")
        assert str(info.value) == (
            "backend 'csgmv' cannot run torch.float32 tensors on cpu; the choices:\n"
            "  torch_native: available\n"
            "  triton: rejected, needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)\n"
            "  csgmv: rejected, needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)"
        )


@pytest.mark.parametrize("backend,kernel", [("auto", "chunk"), ("triton", "torch"), ("torch_native", "chunk")])
def test_raw_op_rejects_unresolved_backend(batch, backend, kernel):
    with pytest.raises(lora_ops.LoRAArgumentError, match=rf"^sgmv_shrink: backend '{backend}' with kernel '{kernel}' is not a resolved choice"):
        torch.ops.lora.sgmv_shrink(torch.randn(5, 16, device=D), torch.randn(2, 16, 16, device=D),
                                   *batch.op_metadata("segment"), 2, batch.chunk_size, backend, kernel)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: backend must be one of torch_native, triton, csgmv, got 'auto'"):
        torch.ops.lora.embedding_a(torch.arange(5, device=D), torch.randn(2, 8, 50, device=D), batch.token_adapter,
                                   batch.adapter_rank, "auto")


def test_raw_ops_check_shapes_and_metadata(batch):
    """Calling torch.ops.lora.* directly gets the same checks as the Python functions."""
    metadata = list(batch.op_metadata("sorted"))
    chunk_size = batch.chunk_size
    x, A = torch.randn(5, 16, device=D), torch.randn(2, 8, 16, device=D)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^sgmv_shrink: weights.shape\[2\] \(in features\) must match x.shape\[1\]: expected 12, got 16"):
        torch.ops.lora.sgmv_shrink(torch.randn(5, 12, device=D), A, *metadata, 2, chunk_size, "triton", "chunk")
    bad = list(metadata)
    bad[3] = metadata[3].long()
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^sgmv_shrink: chunk_start must have dtype int32, got torch.int64"):
        torch.ops.lora.sgmv_shrink(x, A, *bad, 2, chunk_size, "csgmv", "chunk")
    bad[3] = metadata[3][:-1]
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^sgmv_shrink: chunk_start.shape\[0\] must match chunk_adapter.shape\[0\]"):
        torch.ops.lora.sgmv_shrink(x, A, *bad, 2, chunk_size, "csgmv", "chunk")
    y, B, base = torch.randn(5, 16, device=D), torch.randn(2, 20, 8, device=D), torch.randn(5, 20, device=D)
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^qkv_expand: q_size \+ 2\*kv_size must equal base_output.shape\[1\] = 20"):
        torch.ops.lora.qkv_expand(base, y, B, *metadata, batch.adapter_scaling, 10, 4, chunk_size, "triton", "chunk")
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^sgmv_expand: adapter_scaling must have dtype float32, got torch.float64"):
        torch.ops.lora.sgmv_expand(base, y, B, *metadata, batch.adapter_scaling.double(), [0, 12, 20], chunk_size, "triton", "per_token")
    with pytest.raises(lora_ops.LoRAArgumentError, match=r"^embedding_a: token_ids.shape\[0\] \(tokens\) must match the batch's token count: expected 5, got 4"):
        torch.ops.lora.embedding_a(torch.arange(4, device=D), torch.randn(2, 8, 50, device=D), batch.token_adapter, batch.adapter_rank, "triton")
