"""lora_ops: multi-LoRA batch ops for PyTorch, registered as ``torch.ops.lora.*``.

``import lora_ops`` registers the ops. Build a ``LoRABatch`` once per forward and pass it to
the functions below, or call ``torch.ops.lora.*`` directly with its tensors (see ``ops.py``).
"""

from .backends import AUTO, BACKEND_INFO, BACKENDS, BackendError, resolve, use_backend
from .batch import ChunkPlan, LoRABatch, default_chunk_size
from .checks import LoRAArgumentError
from .ops import SCHEMAS, embedding_a, gate_up_expand, qkv_expand, sgmv_expand, sgmv_shrink

__all__ = [
    "AUTO", "BACKENDS", "BACKEND_INFO", "BackendError", "ChunkPlan", "LoRAArgumentError",
    "LoRABatch", "SCHEMAS", "default_chunk_size", "embedding_a", "gate_up_expand", "qkv_expand",
    "resolve", "sgmv_expand", "sgmv_shrink", "use_backend",
]
