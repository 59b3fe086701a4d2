"""Training through the layers: a trainable pool fine-tunes several adapters in one batch of a
Hugging Face Llama (base frozen), and saves each in PEFT format, which PEFT loads back."""

import pytest
import torch

import lora_ops
from hf_models import TARGETS, peft_reference, relative_error, tiny_llama

pytest.importorskip("peft")


def _train(pool, model, names, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(1, 128, (len(names), 6), generator=gen)
    optimizer = torch.optim.Adam(pool.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with pool.adapters(names):
            loss = model(token_ids, labels=token_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return token_ids, losses


def test_mixed_adapters_train_and_save_as_peft(tmp_path):
    model = tiny_llama()
    pool = lora_ops.AdapterPool(max_adapters=3, max_rank=8, trainable=True)
    lora_ops.patch_model(model, pool, target_modules=TARGETS)
    pool.new_adapter("small", r=4, lora_alpha=8, generator=torch.Generator().manual_seed(1))
    pool.new_adapter("large", r=8, lora_alpha=4, generator=torch.Generator().manual_seed(2))
    assert all(p.requires_grad and p.is_leaf for p in pool.parameters())
    before = [p.detach().clone() for p in pool.parameters()]

    token_ids, losses = _train(pool, model, ["small", "large", None], steps=3)

    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for name, p in model.named_parameters() if "base" in name)  # frozen
    unused_slot = 2
    for p, p0 in zip(pool.parameters(), before):
        assert torch.equal(p[unused_slot], p0[unused_slot]), "a slot without tokens changed"
    q = pool.modules["model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj"]
    small = pool.adapter_names["small"]
    assert not q.lora_a[small].view(3, 8, -1)[:, 4:].any(), "rows past rank 4 got a gradient"

    paths = {}
    for name in ("small", "large"):
        paths[name] = str(tmp_path / name)
        pool.save(name, paths[name])
    reference = peft_reference(tiny_llama(), paths)
    with torch.no_grad(), pool.adapters(["small", "large", None]):
        logits = model(token_ids).logits
    with torch.no_grad():
        expected = reference(token_ids, adapter_names=["small", "large", "__base__"]).logits
    assert relative_error(logits, expected) <= 1e-4


def test_save_refuses_a_shared_a_that_training_split():
    pool = lora_ops.AdapterPool(max_adapters=1, max_rank=4, trainable=True)
    layer = lora_ops.LoRAQKVLinear(torch.nn.Linear(8, 16), pool, "qkv_proj", q_size=8, kv_size=4)
    config = dict(r=2, lora_alpha=2, target_modules=["qkv_proj"])
    pool.load("fused", {"qkv_proj.lora_A.weight": torch.randn(2, 8), "qkv_proj.lora_B.weight": torch.randn(16, 2)},
              config)
    with torch.no_grad():
        layer.lora.lora_a[0, 4:6] += 1  # slice k's copy of the shared A moves
    with pytest.raises(lora_ops.AdapterError, match=r"slices share A, but their A differ"):
        pool.save("fused", "unused")
