"""A patched Hugging Face Llama against PEFT's own mixed-batch forward (``adapter_names=``).

Three PEFT adapters of different ranks and alphas (one with rank/alpha patterns and rsLoRA and
an lm_head, one on embed_tokens), sequences with different adapters and some with none.
"""

import pytest
import torch

import lora_ops
from conftest import DEVICE, kernel_backends, requires_cuda
from hf_models import patched, peft_reference, relative_error, save_adapters, tiny_llama

NAMES = ["all_linear", None, "patterned", "embedding", "__base__"]
PEFT_NAMES = [name or "__base__" for name in NAMES]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = tiny_llama()
    paths = save_adapters(model, tmp_path_factory.mktemp("adapters"))
    return model, paths, peft_reference(model, paths)


def _token_ids(rows, length, seed=0):
    return torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["torch_native", *kernel_backends()])
def test_logits_match_peft(models, backend):
    if backend != "torch_native" and DEVICE == "cuda":
        pytest.skip("the Triton backends run the CPU model only in the interpreter; the GPU test covers them")
    model, paths, reference = models
    ours, pool = patched(model, paths)
    # Triton's interpreter is slow: a smaller batch for the kernel backends on CPU
    rows, length = (5, 7) if backend == "torch_native" or DEVICE == "cuda" else (3, 3)
    token_ids = _token_ids(rows, length)
    with torch.no_grad(), lora_ops.use_backend(backend), pool.adapters(NAMES[:rows]):
        logits = ours(token_ids).logits
    with torch.no_grad():
        expected = reference(token_ids, adapter_names=PEFT_NAMES[:rows]).logits
    assert relative_error(logits, expected) <= 1e-4
    assert relative_error(model(token_ids).logits, expected) > 0.1  # the adapters do change the logits


def test_compiled_fullgraph_matches_peft_and_sees_reloads(models):
    model, paths, reference = models
    ours, pool = patched(model, paths)
    token_ids = _token_ids(5, 7)
    with torch.no_grad(), pool.adapters(NAMES, seq_lens=[7] * 5):
        assert torch._dynamo.explain(ours)(token_ids).graph_break_count == 0
        compiled = torch.compile(ours, fullgraph=True)
        logits = compiled(token_ids).logits
        # reloading writes the pool's buffers in place: the compiled model serves the new weights
        pool.load("patterned", paths["all_linear"])
        reloaded = compiled(token_ids).logits
    with torch.no_grad():
        expected = reference(token_ids, adapter_names=PEFT_NAMES).logits
        expected_reloaded = reference(token_ids, adapter_names=["all_linear", "__base__", "all_linear",
                                                                "embedding", "__base__"]).logits
    assert relative_error(logits, expected) <= 1e-4
    assert relative_error(reloaded, expected_reloaded) <= 1e-4


def test_generate_matches_peft(models):
    model, paths, reference = models
    ours, pool = patched(model, paths)
    token_ids = _token_ids(5, 6, seed=1)
    attention_mask = torch.ones_like(token_ids)
    attention_mask[1, :2] = attention_mask[3, :4] = 0  # left padding
    token_ids[attention_mask == 0] = 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pool.adapters(NAMES):
        tokens = ours.generate(token_ids, **settings)
    with torch.no_grad():
        expected = reference.generate(input_ids=token_ids, adapter_names=PEFT_NAMES, **settings)
    assert torch.equal(tokens, expected)


def test_attention_mask_batch_skips_padding(models):
    """A batch from an attention mask: padding gets no adapter, real tokens match PEFT."""
    model, paths, reference = models
    ours, pool = patched(model, paths)
    token_ids = _token_ids(5, 5, seed=2)
    attention_mask = torch.ones_like(token_ids)
    attention_mask[0, :3] = attention_mask[2, :1] = 0
    with torch.no_grad(), pool.adapters(NAMES, attention_mask=attention_mask):
        logits = ours(token_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        expected = reference(token_ids, attention_mask=attention_mask, adapter_names=PEFT_NAMES).logits
    real = attention_mask.bool()
    assert relative_error(logits[real], expected[real]) <= 1e-4


@requires_cuda
@pytest.mark.parametrize("backend", ["torch_native", "triton", "csgmv"])
def test_bfloat16_on_gpu_matches_peft_within_its_own_error(models, backend):
    """bf16 logits: error against float32 PEFT at most twice PEFT-in-bf16's own error."""
    model, paths, _ = models
    fp32 = peft_reference(model.to("cuda"), paths)
    bf16_model = tiny_llama(dtype=torch.bfloat16, device="cuda")
    bf16_model.load_state_dict(model.state_dict())
    bf16_reference = peft_reference(bf16_model, paths)
    ours, pool = patched(bf16_model, paths)
    token_ids = _token_ids(5, 64).cuda()
    with torch.no_grad():
        expected = fp32(token_ids, adapter_names=PEFT_NAMES).logits
        peft_error = relative_error(bf16_reference(token_ids, adapter_names=PEFT_NAMES).logits, expected)
        with lora_ops.use_backend(backend), pool.adapters(NAMES):
            error = relative_error(ours(token_ids).logits, expected)
    model.to("cpu")
    assert error <= 2 * peft_error + 1e-3, f"lora_ops bf16 error {error:.2e}, PEFT bf16 error {peft_error:.2e}"
