"""LoRA layers on a plain nn.Module, fused and unfused projections, and the adapter pool.

A toy block with separate q/k/v and gate/up linears is the reference (PEFT's own mixed-batch
forward on it); the same block with fused ``qkv_proj`` / ``gate_up_proj`` linears, patched by
name, must give the same outputs from the same adapters.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import lora_ops
from hf_models import relative_error

VOCAB, HIDDEN, Q_SIZE, KV_SIZE, INTER = 40, 32, 32, 16, 24
SEPARATE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "embed")
NAMES = ["all", None, "few", "__base__"]  # adapter per row


class ToyBlock(nn.Module):
    """Embedding, q/k/v and gate/up/down projections; ``fused`` holds them as qkv_proj and
    gate_up_proj with the same weights as the separate form's."""

    def __init__(self, fused_from: "ToyBlock | None" = None):
        super().__init__()
        if fused_from is None:
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(HIDDEN, size) for size in (Q_SIZE, KV_SIZE, KV_SIZE))
            self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER), nn.Linear(HIDDEN, INTER)
            self.down_proj = nn.Linear(INTER, HIDDEN)
            return
        self.embed, self.down_proj = fused_from.embed, fused_from.down_proj
        self.qkv_proj = _fused_linear(fused_from.q_proj, fused_from.k_proj, fused_from.v_proj)
        self.gate_up_proj = _fused_linear(fused_from.gate_proj, fused_from.up_proj)

    def forward(self, token_ids):
        hidden = self.embed(token_ids)
        if hasattr(self, "qkv_proj"):
            qkv, gate_up = self.qkv_proj(hidden), self.gate_up_proj(hidden)
        else:
            qkv = torch.cat([self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)], -1)
            gate_up = torch.cat([self.gate_proj(hidden), self.up_proj(hidden)], -1)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.cat([qkv, self.down_proj(nn.functional.silu(gate) * up)], -1)


def _fused_linear(*linears):
    fused = nn.Linear(HIDDEN, sum(linear.out_features for linear in linears))
    fused.weight.data = torch.cat([linear.weight for linear in linears])
    fused.bias.data = torch.cat([linear.bias for linear in linears])
    return fused


def toy_adapters(block, configs):
    """name -> (LoraConfig, state dict in PEFT's saved key format), random A and B."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    adapters = {}
    for name, arguments in configs.items():
        config = LoraConfig(**arguments)
        peft_block = get_peft_model(copy.deepcopy(block), config)
        state = {key: torch.randn(value.shape) / 4 for key, value in get_peft_model_state_dict(peft_block).items()}
        adapters[name] = (config, state)
    return adapters


def peft_outputs(block, adapters, token_ids, names):
    from peft import get_peft_model, set_peft_model_state_dict

    peft_block = None
    for name, (config, state) in adapters.items():
        if peft_block is None:
            peft_block = get_peft_model(copy.deepcopy(block), config, adapter_name=name)
        else:
            peft_block.add_adapter(name, config)
        set_peft_model_state_dict(peft_block, state, adapter_name=name)
    with torch.no_grad():
        return peft_block.eval()(token_ids, adapter_names=[name or "__base__" for name in names])


def patch_toy(block, adapters, targets=SEPARATE, max_adapters=3, **patch_args):
    pool = lora_ops.AdapterPool(max_adapters=max_adapters, max_rank=8)
    block = lora_ops.patch_model(copy.deepcopy(block), pool, target_modules=targets, **patch_args)
    for name, (config, state) in adapters.items():
        pool.load(name, state, config=config)
    return block, pool


def run(block, pool, token_ids, names=NAMES):
    with torch.no_grad(), pool.adapters(names):
        return block(token_ids)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    block = ToyBlock().eval()
    adapters = toy_adapters(block, {
        "all": dict(r=4, lora_alpha=8, target_modules=list(SEPARATE)),
        "few": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "v_proj", "up_proj", "embed"],
                  rank_pattern={"v_proj": 3}),
    })
    token_ids = torch.randint(0, VOCAB, (len(NAMES), 5))
    return block, adapters, token_ids, peft_outputs(block, adapters, token_ids, NAMES)


@pytest.fixture(scope="module")
def all_rows_all(toy):
    """PEFT's output with adapter "all" on every row."""
    block, adapters, token_ids, _ = toy
    return peft_outputs(block, adapters, token_ids, ["all"] * len(NAMES))


@pytest.mark.parametrize("fuse", [True, False])
def test_separate_projections_match_peft(toy, fuse):
    block, adapters, token_ids, expected = toy
    ours, pool = patch_toy(block, adapters, fuse_qkv=fuse, fuse_gate_up=fuse)
    assert isinstance(ours.q_proj, lora_ops.LoRAMergedSlice if fuse else lora_ops.LoRALinear)
    assert relative_error(run(ours, pool, token_ids), expected) <= 1e-5


def test_fused_projections_take_unfused_adapters(toy):
    """qkv_proj / gate_up_proj filled slice by slice from q/k/v and gate/up adapters."""
    block, adapters, token_ids, expected = toy
    fused, pool = patch_toy(ToyBlock(fused_from=block), adapters, targets=("qkv_proj", "gate_up_proj", "down_proj", "embed"),
                            qkv_sizes=(Q_SIZE, KV_SIZE))
    assert isinstance(fused.qkv_proj, lora_ops.LoRAQKVLinear) and isinstance(fused.gate_up_proj, lora_ops.LoRAGateUpLinear)
    assert relative_error(run(fused, pool, token_ids), expected) <= 1e-5


def test_fused_projection_adapters_of_the_whole_module():
    """A PEFT adapter of the fused linear itself: one A shared by the slices, B split."""
    torch.manual_seed(1)
    fused = ToyBlock(fused_from=ToyBlock()).eval()
    targets = ("qkv_proj", "gate_up_proj")
    adapters = toy_adapters(fused, {"all": dict(r=4, lora_alpha=8, target_modules=list(targets)),
                                    "few": dict(r=2, lora_alpha=8, target_modules=["qkv_proj"])})
    token_ids = torch.randint(0, VOCAB, (len(NAMES), 3))
    ours, pool = patch_toy(fused, adapters, targets=targets, qkv_sizes=(Q_SIZE, KV_SIZE))
    assert relative_error(run(ours, pool, token_ids), peft_outputs(fused, adapters, token_ids, NAMES)) <= 1e-5


def test_layers_take_any_leading_dims_and_an_explicit_batch(toy):
    block, adapters, _, _ = toy
    ours, pool = patch_toy(block, adapters)
    x = torch.randn(2, 3, HIDDEN)
    batch = pool.make_batch(["all", "few"], seq_lens=[3, 3])
    with torch.no_grad():
        flat = ours.gate_proj(x.reshape(6, HIDDEN), batch=batch)
        shaped = ours.gate_proj(x, batch=batch)
        base = ours.gate_proj.base(x)
    assert shaped.shape == (2, 3, INTER) and torch.equal(shaped.reshape(6, INTER), flat)
    assert not torch.allclose(shaped, base)


def test_no_active_adapters_runs_the_base(toy):
    block, adapters, token_ids, _ = toy
    ours, _ = patch_toy(block, adapters)
    with torch.no_grad():
        assert torch.equal(ours(token_ids), block(token_ids))


def test_import_lora_ops_needs_no_hugging_face_packages():
    code = "import sys, lora_ops; print(sorted({'peft', 'transformers', 'safetensors'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ---- the pool ----


def pool_state(pool):
    return (pool.adapter_names, list(pool._slot_rank),
            {name: (slots.lora_a.clone(), slots.lora_b.clone()) for name, slots in pool.modules.items()})


def assert_same_state(before, after):
    assert before[:2] == after[:2]
    for name, (lora_a, lora_b) in before[2].items():
        assert torch.equal(lora_a, after[2][name][0]) and torch.equal(lora_b, after[2][name][1]), name


def test_load_evict_reload_and_slot_reuse(toy, all_rows_all):
    block, adapters, token_ids, expected = toy
    ours, pool = patch_toy(block, adapters, max_adapters=2)
    config_all, state_all = adapters["all"]
    with pytest.raises(lora_ops.AdapterError, match="all 2 slots are taken"):
        pool.load("copy", state_all, config=config_all)
    slot_few = pool.adapter_names["few"]
    pool.evict("few")
    with pytest.raises(KeyError, match="'few' is not loaded"):
        run(ours, pool, token_ids)
    # slot reuse: "copy" (of "all") takes few's slot and gives all's output, nothing of few's
    assert pool.load("copy", state_all, config=config_all) == slot_few
    assert relative_error(run(ours, pool, token_ids, ["all", "copy", "copy", "all"]), all_rows_all) <= 1e-5
    pool.evict("copy")
    assert pool.load("few", *reversed(adapters["few"])) == slot_few
    assert relative_error(run(ours, pool, token_ids), expected) <= 1e-5


def test_reload_replaces_in_place(toy, all_rows_all):
    block, adapters, token_ids, _ = toy
    ours, pool = patch_toy(block, adapters)
    buffers = [slots.lora_a for slots in pool.modules.values()]
    pool.load("few", *reversed(adapters["all"]))  # "few" now holds all's weights, in the same slot and tensors
    assert all(slots.lora_a is buffer for slots, buffer in zip(pool.modules.values(), buffers))
    assert relative_error(run(ours, pool, token_ids, ["all", "few", "few", "all"]), all_rows_all) <= 1e-5


def _with_key(state, key_part, shape):
    key = next(key for key in state if key_part in key)
    return {**state, key: torch.randn(shape)}


def _config(**change):
    return lambda config, state: ({**config, **change}, state)


def _state(change):
    return lambda config, state: (config, change(state))


@pytest.mark.parametrize("bad_adapter, message", [
    (_config(use_dora=True), "use_dora=True"),
    (_config(fan_in_fan_out=True), "fan_in_fan_out=True"),
    (_config(bias="all"), "bias='all'"),
    (_config(lora_bias=True), "lora_bias=True"),
    (_config(modules_to_save=["down_proj"]), "modules_to_save"),
    (_config(r=16), "config gives rank 16"),
    (_state(lambda state: _with_key(state, "q_proj.lora_B", (Q_SIZE + 1, 4))), "do not fit the module"),
    (_state(lambda state: _with_key(state, "k_proj.lora_A", (4, HIDDEN + 2))), "do not fit the module"),
    (_state(lambda state: {**state, "base_model.model.o_proj.lora_A.weight": torch.randn(4, HIDDEN),
                           "base_model.model.o_proj.lora_B.weight": torch.randn(HIDDEN, 4)}), "no patched module maps"),
    (_state(lambda state: {key: value for key, value in state.items() if "q_proj.lora_B" not in key}), "only lora_A"),
    (_state(lambda state: {**state, "base_model.model.q_proj.lora_magnitude_vector": torch.randn(Q_SIZE)}), "unsupported key"),
])
def test_bad_adapters_raise_and_leave_the_pool(toy, bad_adapter, message):
    block, adapters, _, _ = toy
    _, pool = patch_toy(block, adapters)
    config, state = adapters["all"]
    config, state = bad_adapter(config.to_dict(), state)
    before = pool_state(pool)
    with pytest.raises(lora_ops.AdapterError, match=message):
        pool.load("all", state, config=config)
    assert_same_state(before, pool_state(pool))


def test_rank_above_the_pools_max_rank_raises(toy):
    block, _, _, _ = toy
    config, state = toy_adapters(block, {"big": dict(r=16, lora_alpha=16, target_modules=["q_proj"])})["big"]
    _, pool = patch_toy(block, {})
    with pytest.raises(lora_ops.AdapterError, match="rank 16 exceeds the pool's max_rank 8"):
        pool.load("big", state, config=config)
    assert pool.adapter_names == {}


def test_checkpoint_files_missing_or_corrupt(toy, tmp_path):
    from safetensors.torch import save_file

    block, adapters, token_ids, expected = toy
    ours, pool = patch_toy(block, {"few": adapters["few"]})
    config, state = adapters["all"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        pool.load("all", tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    before = pool_state(pool)
    with pytest.raises(lora_ops.AdapterError, match="cannot read it"):
        pool.load("all", tmp_path)
    assert_same_state(before, pool_state(pool))
    save_file(state, tmp_path / "adapter_model.safetensors")
    pool.load("all", tmp_path)
    assert relative_error(run(ours, pool, token_ids), expected) <= 1e-5


def test_patching_after_loading_or_twice_raises(toy):
    block, adapters, _, _ = toy
    ours, pool = patch_toy(block, adapters)
    with pytest.raises(ValueError, match="already patched"):
        lora_ops.patch_model(ours, pool, target_modules=SEPARATE)
    with pytest.raises(RuntimeError, match="before loading adapters"):
        lora_ops.LoRALinear(nn.Linear(4, 4), pool, "extra")
