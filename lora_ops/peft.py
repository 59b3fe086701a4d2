"""Reading PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Turns a checkpoint into one ``ModuleLoRA`` (A, B, scaling) per adapted module, named as in the
base model (``model.layers.0.self_attn.q_proj``). PEFT's per-module ``rank_pattern`` and
``alpha_pattern`` and rsLoRA give each module its own scaling. ``safetensors`` is imported only
when a file is read, so ``import lora_ops`` does not need it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


class AdapterError(ValueError):
    """An adapter that cannot be loaded: unsupported config, bad keys or shapes, unreadable file."""


# Config fields that change the math of a LoRA layer beyond A, B and a scaling: each must keep
# the value given here (or be absent).
_UNSUPPORTED_UNLESS = {
    "peft_type": "LORA",
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
}

# PEFT's saved key: optional model prefix, module path, which LoRA matrix.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<matrix>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class ModuleLoRA:
    """One module's adapter: ``delta = scaling * B @ A`` (embeddings: A is ``(r, vocab)``)."""

    lora_a: torch.Tensor  # (r, in) or, for an embedding, (r, vocab)
    lora_b: torch.Tensor  # (out, r)
    scaling: float
    is_embedding: bool

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT adapter directory (read on the CPU)."""
    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            raise FileNotFoundError(f"PEFT adapter {os.fspath(path)!r}: missing {os.path.basename(required)}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(config_path) as file:
            config = json.load(file)
        state = load_file(weights_path)
    except (OSError, ValueError, SafetensorError) as error:
        raise AdapterError(f"PEFT adapter {os.fspath(path)!r}: cannot read it ({error})") from error
    return config, state


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def check_config(config: Mapping) -> None:
    for field, accepted in _UNSUPPORTED_UNLESS.items():
        value = config.get(field, accepted)
        if value != accepted and not (accepted is None and not value):
            raise AdapterError(f"unsupported PEFT config: {field}={value!r} (lora_ops supports {field}={accepted!r})")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise AdapterError(f"PEFT config lacks {field!r}")


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's rule: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_scaling(config: Mapping, module: str) -> tuple[int, float]:
    """The rank and scaling PEFT gives ``module``, from ``r``/``lora_alpha`` and their patterns."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def adapter_modules(config, state: Mapping[str, torch.Tensor]) -> dict[str, ModuleLoRA]:
    """Each adapted module's A, B and scaling; raises ``AdapterError`` on anything it cannot map."""
    config = _config_dict(config)
    check_config(config)
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    embeddings = set()
    for key, tensor in state.items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT saves the base embedding beside an embedding adapter; the model has its own
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"unsupported key in adapter weights: {key!r} (expected ...lora_A.weight / lora_B.weight)")
        matrices.setdefault(match["module"], {})[match["matrix"][-1]] = tensor
        if "embedding" in match["matrix"]:
            embeddings.add(match["module"])
    modules = {}
    for module, pair in matrices.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{module}: adapter weights hold only lora_{''.join(pair)}")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(f"{module}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} are not (r, in) and (out, r)")
        rank, scaling = module_scaling(config, module)
        if rank != lora_a.shape[0]:
            raise AdapterError(f"{module}: config gives rank {rank} (r / rank_pattern), weights have rank {lora_a.shape[0]}")
        modules[module] = ModuleLoRA(lora_a, lora_b, scaling, module in embeddings)
    if not modules:
        raise AdapterError("adapter weights hold no LoRA matrices")
    return modules


def lora_config(r: int, lora_alpha: float, target_modules: list[str]) -> dict:
    """A PEFT ``adapter_config.json`` dict for a plain LoRA adapter of rank ``r``."""
    return {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": sorted(target_modules),
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "task_type": None,
            "base_model_name_or_path": None, "inference_mode": True}


def write_checkpoint(path: str | os.PathLike, config: Mapping, modules: Mapping[str, ModuleLoRA]) -> None:
    """Write a PEFT adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``
    with PEFT's key names (``base_model.model.<module>.lora_A.weight``; embeddings
    ``lora_embedding_A``/``lora_embedding_B``). B is written as PEFT keeps it, without the scaling."""
    from safetensors.torch import save_file

    state = {}
    for module, lora in modules.items():
        names = ("lora_embedding_A", "lora_embedding_B") if lora.is_embedding else ("lora_A.weight", "lora_B.weight")
        for name, tensor in zip(names, (lora.lora_a, lora.lora_b)):
            state[f"base_model.model.{module}.{name}"] = tensor.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as file:
        json.dump(_config_dict(config), file, indent=2, default=lambda value: sorted(value))  # sets of names
