"""Serve three PEFT adapters of different ranks in one mixed batch of a Hugging Face Llama.

A small Llama is built from a config (random weights, no download) and three PEFT adapters are
saved to a temporary directory; then the user code loads them, patches the model and serves a
mixed batch (forward and generate). The result is checked against PEFT's own mixed-batch
forward. Runs on CPU (float32, torch_native) and uses the GPU when there is one (bfloat16).
"""

import copy
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1000)
model = LlamaForCausalLM(config).to(device, dtype).eval()

# Three adapters, as a training run would have saved them (random A and B instead of trained ones).
adapter_dir = tempfile.mkdtemp()
adapter_configs = {
    "support": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "legal": LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "code": LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
for name, lora_config in adapter_configs.items():
    peft_model = get_peft_model(copy.deepcopy(model), lora_config)
    for key, weight in peft_model.named_parameters():
        if "lora_" in key:
            weight.data = torch.randn_like(weight) / weight.shape[1] ** 0.5
    peft_model.save_pretrained(f"{adapter_dir}/{name}")
reference = PeftModel.from_pretrained(copy.deepcopy(model), f"{adapter_dir}/support", adapter_name="support")
for name in ("legal", "code"):
    reference.load_adapter(f"{adapter_dir}/{name}", adapter_name=name)
input_ids = torch.randint(0, config.vocab_size, (4, 12), device=device)
attention_mask = torch.ones_like(input_ids)

# ---- user code: load the adapters, patch the model, serve a mixed batch ----
pool = lora_ops.AdapterPool(max_adapters=4, max_rank=16)
lora_ops.patch_model(model, pool)  # q/k/v/o and gate/up/down of every layer; q/k/v and gate/up fused
for name in ("support", "legal", "code"):
    pool.load(name, f"{adapter_dir}/{name}")
adapter_per_sequence = ["support", None, "legal", "code"]  # None: the base model
with torch.no_grad(), pool.adapters(adapter_per_sequence):
    logits = model(input_ids).logits
    tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
# ---- end of user code ----

peft_names = [name or "__base__" for name in adapter_per_sequence]
with torch.no_grad():
    expected = reference(input_ids, adapter_names=peft_names).logits
    expected_tokens = reference.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=peft_names,
                                         max_new_tokens=8, do_sample=False)
error = ((logits.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
print(f"{device}, {dtype}: logits relative error vs PEFT {error:.1e}; "
      f"generated tokens equal to PEFT's: {torch.equal(tokens, expected_tokens)}")
if dtype == torch.float32:
    assert error <= 1e-4 and torch.equal(tokens, expected_tokens)
