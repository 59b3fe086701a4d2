"""``patch_model``: wrap the target modules of a model with LoRA layers backed by one pool."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from .layers import (LoRAEmbedding, LoRAGateUpLinear, LoRALinear, LoRALMHead, LoRAMergedSlice, LoRAQKVLinear,
                     merge_linears)
from .pool import AdapterPool

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
GATE_UP_NAMES = ("gate_proj", "up_proj")
# Already-fused projections of some models (Phi-3): adapters of the unfused names fill their slices.
FUSED_QKV_NAME = "qkv_proj"
FUSED_GATE_UP_NAME = "gate_up_proj"


def _is_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a regex must match the whole path; a name must equal the path's end."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _qkv_sizes(model: nn.Module, qkv_sizes: tuple[int, int] | None) -> tuple[int, int]:
    if qkv_sizes is not None:
        return qkv_sizes
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"patch_model: a fused {FUSED_QKV_NAME} needs qkv_sizes=(q_size, kv_size) (no model.config)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim


def _lay_out_batch(pool: AdapterPool, module, args, kwargs) -> None:
    """Forward pre-hook: adapters chosen per row follow the input's ``(rows, length)``."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    is_ids = isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and not tokens.is_floating_point()
    is_embeds = isinstance(tokens, torch.Tensor) and tokens.dim() == 3 and tokens.is_floating_point()
    if is_ids or is_embeds:
        pool.begin_forward(tokens.shape[0], tokens.shape[1])


def patch_model(model: nn.Module, pool: AdapterPool, target_modules: str | Sequence[str] = LLAMA_TARGETS,
                fuse_qkv: bool = True, fuse_gate_up: bool = True,
                qkv_sizes: tuple[int, int] | None = None) -> nn.Module:
    """Wrap ``model``'s target modules, in place, with LoRA layers whose adapters live in ``pool``.

    Args:
        model: a Hugging Face ``LlamaForCausalLM`` or Llama-style model (Mistral, Qwen2, ...),
            or any ``nn.Module``; patch it after moving it to its device and dtype.
        pool: the ``AdapterPool`` (load adapters after patching).
        target_modules: as PEFT's: names matched against the end of each module path, or one
            regex matched against the whole path. ``nn.Linear`` and ``nn.Embedding`` only; the
            model's output embeddings (``lm_head``) get LoRA at the positions whose logits it computes.
        fuse_qkv / fuse_gate_up: sibling ``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``)
            all targeted are computed together: one shrink and one ``qkv_expand`` / ``gate_up_expand``.
        qkv_sizes: ``(q_size, kv_size)`` of an already-fused ``qkv_proj``; default from ``model.config``.

    Also installs a forward pre-hook so that adapters chosen per row (``pool.adapters(names)``)
    follow each forward's input, as in ``model.generate()``. Returns ``model``.
    """
    targets = {name: module for name, module in model.named_modules() if name and _is_target(name, target_modules)}
    for name, module in targets.items():
        if isinstance(module, (LoRALinear, LoRAEmbedding, LoRAMergedSlice)):
            raise ValueError(f"patch_model: {name} is already patched")
        if type(module) not in (nn.Linear, nn.Embedding):
            raise TypeError(f"patch_model: target {name} is a {type(module).__name__}; only nn.Linear and nn.Embedding are supported")
    if not targets:
        raise ValueError(f"patch_model: no module matches target_modules={target_modules!r}")
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replacements: dict[str, nn.Module] = {}
    for group, fuse in ((QKV_NAMES, fuse_qkv), (GATE_UP_NAMES, fuse_gate_up)):
        if not fuse:
            continue
        for name in [name for name in targets if name.endswith("." + group[0]) or name == group[0]]:
            prefix = name[: -len(group[0])]
            names = [prefix + child for child in group]
            if all(sibling in targets for sibling in names):
                replacements.update(zip(names, merge_linears([targets[n] for n in names], pool, names)))
    for name, module in targets.items():
        if name in replacements:
            continue
        child = name.rpartition(".")[2]
        prefix = name[: -len(child)]  # the parent's path and a dot, or nothing
        if isinstance(module, nn.Embedding):
            replacements[name] = LoRAEmbedding(module, pool, name)
        elif module is output_embeddings:
            replacements[name] = LoRALMHead(module, pool, name)
        elif child == FUSED_QKV_NAME:
            replacements[name] = LoRAQKVLinear(module, pool, name, *_qkv_sizes(model, qkv_sizes),
                                               [prefix + sibling for sibling in QKV_NAMES])
        elif child == FUSED_GATE_UP_NAME:
            replacements[name] = LoRAGateUpLinear(module, pool, name, [prefix + sibling for sibling in GATE_UP_NAMES])
        else:
            replacements[name] = LoRALinear(module, pool, name)
    for name, replacement in replacements.items():
        model.set_submodule(name, replacement)
    model.register_forward_pre_hook(partial(_lay_out_batch, pool), with_kwargs=True)
    return model
