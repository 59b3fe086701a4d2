"""lora_ops: multi-LoRA batch ops for PyTorch, registered as ``torch.ops.lora.*``.

``import lora_ops`` registers the ops. Build a ``LoRABatch`` once per forward and pass it to
the functions below, or call ``torch.ops.lora.*`` directly with its tensors (see ``ops.py``).
"""

from .batch import ChunkPlan, LoRABatch, default_chunk_size
from .checks import LoRAArgumentError
from .dispatch import (
    AUTO, BACKEND_INFO, BACKENDS, BackendError, Decision, explain, resolve, use_backend,
)
from .ops import SCHEMAS, embedding_a, gate_up_expand, qkv_expand, sgmv_expand, sgmv_shrink
# model-facing: LoRA layers, the adapter pool, PEFT adapters, patching a model
from .layers import (LoRAEmbedding, LoRAGateUpLinear, LoRALinear, LoRALMHead, LoRAMergedSlice, LoRAQKVLinear,
                     add_lora, merge_linears)
from .patch import patch_model
from .peft import AdapterError
from .pool import AdapterPool

__all__ = [
    "AUTO", "BACKENDS", "BACKEND_INFO", "BackendError", "ChunkPlan", "Decision",
    "LoRAArgumentError", "LoRABatch", "SCHEMAS", "default_chunk_size", "embedding_a", "explain",
    "gate_up_expand", "qkv_expand", "resolve", "sgmv_expand", "sgmv_shrink", "use_backend",
    "AdapterError", "AdapterPool", "LoRAEmbedding", "LoRAGateUpLinear", "LoRALMHead", "LoRALinear",
    "LoRAMergedSlice", "LoRAQKVLinear", "add_lora", "merge_linears", "patch_model",
]
