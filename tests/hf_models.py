"""A tiny Hugging Face Llama and PEFT adapters for it, shared by the layer and PEFT test files.

The model is built from a config (random weights, no download), with grouped-query attention so
that q and k/v widths differ. Adapters get random non-zero A and B (PEFT starts B, and an
embedding's A, at zero, which would hide any error).
"""

from __future__ import annotations

import copy

import torch

import lora_ops

TARGETS = (*lora_ops.patch.LLAMA_TARGETS, "embed_tokens", "lm_head")

# name -> LoraConfig arguments: different ranks and alphas, a rank/alpha pattern with rsLoRA,
# an embedding adapter, and adapters that leave some modules alone.
ADAPTERS = {
    "all_linear": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]),
    "patterned": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj", "lm_head"],
                      rank_pattern={"layers.1.self_attn.q_proj": 16, "v_proj": 2}, alpha_pattern={"up_proj": 3}),
    "embedding": dict(r=6, lora_alpha=3, target_modules=["embed_tokens", "k_proj", "gate_proj", "down_proj"]),
}


def tiny_llama(seed: int = 0, dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_adapters(model, directory, adapters=ADAPTERS, seed: int = 1) -> dict[str, str]:
    """Saves one PEFT adapter per entry of ``adapters`` (random A and B) under ``directory``."""
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for name, arguments in adapters.items():
        peft_model = get_peft_model(copy.deepcopy(model).float(), LoraConfig(**arguments))
        for key, weight in peft_model.named_parameters():
            if "lora_" in key:  # A ~ 1/sqrt(in), B ~ 1/sqrt(r): deltas of the base's size
                fan_in = weight.shape[0] if "embedding_A" in key else weight.shape[1]
                weight.data = torch.randn(weight.shape, generator=generator) / fan_in**0.5
        paths[name] = f"{directory}/{name}"
        peft_model.save_pretrained(paths[name])
    return paths


def peft_reference(model, paths: dict[str, str]):
    """PEFT's own model with every adapter loaded, for its ``adapter_names=`` mixed batch."""
    from peft import PeftModel

    names = list(paths)
    reference = PeftModel.from_pretrained(copy.deepcopy(model), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(paths[name], adapter_name=name)
    return reference.eval()


def patched(model, paths: dict[str, str], max_rank: int = 16, **patch_args):
    """A copy of ``model`` patched by lora_ops with every adapter loaded, and its pool."""
    pool = lora_ops.AdapterPool(max_adapters=len(paths) + 1, max_rank=max_rank)
    ours = lora_ops.patch_model(copy.deepcopy(model), pool, target_modules=TARGETS, **patch_args)
    for name, path in paths.items():
        pool.load(name, path)
    return ours, pool


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference.double()).abs().max() / reference.double().abs().max()).item()
