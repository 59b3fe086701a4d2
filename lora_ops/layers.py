"""LoRA layers that wrap a model's modules (without copying their weights) and add the pool's
adapters, each token with its own, through the ``lora_ops`` functions.

Every layer takes ``(..., in)`` input, flattens the leading dims for the ops and restores them.
Its batch is the pool's active one (``AdapterPool.adapters``) unless ``batch=`` is passed; with
neither, it is the base module alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import ops
from .batch import LoRABatch
from .pool import AdapterPool, ModuleSlots


def add_lora(x: torch.Tensor, out: torch.Tensor, lora: ModuleSlots, batch: LoRABatch) -> torch.Tensor:
    """``out + scaling * x A^T B^T`` per token, with 1, 2 (gate/up) or 3 (q/k/v) output slices:
    one shrink and one expand. Adds into ``out`` in place under no_grad / inference mode, else
    out of place (differentiable); returns the result."""
    return _add_expanded(_shrink(x, lora, batch), out, lora, batch)


def _lora_forward(compute_base: Callable[[], torch.Tensor], x: torch.Tensor, lora: ModuleSlots,
                  batch: LoRABatch, pool: AdapterPool) -> torch.Tensor:
    """``add_lora(x, compute_base(), ...)``, where ``compute_base()`` is the base output for ``x``.

    While a CUDA graph is captured (in inference, not inside ``torch.compile``), for up to
    OVERLAP_MAX_TOKENS tokens, the shrink runs on a side stream beside the base GEMM
    (``pool.overlap_shrink``): it needs only ``x``, so its launch and run hide behind the GEMM;
    the expand waits for both. Eager calls stay on one stream: there the host is the bottleneck,
    and the fork and join cost host time.
    """
    side = _side_stream(x, pool)
    if side is None:
        return add_lora(x, compute_base(), lora, batch)
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        y = _shrink(x, lora, batch)
    out = compute_base()
    main.wait_stream(side)
    y.record_stream(main)  # allocated on the side stream, read by the expand on this one
    return _add_expanded(y, out, lora, batch)


def _shrink(x: torch.Tensor, lora: ModuleSlots, batch: LoRABatch) -> torch.Tensor:
    return ops.sgmv_shrink(x.reshape(-1, x.shape[-1]).contiguous(), lora.lora_a, batch, len(lora.slice_sizes))


def _add_expanded(y: torch.Tensor, out: torch.Tensor, lora: ModuleSlots, batch: LoRABatch) -> torch.Tensor:
    out_flat = out.reshape(-1, out.shape[-1])
    sizes = lora.slice_sizes
    in_place = not torch.is_grad_enabled()  # training: out of place, no copy back into out
    if len(sizes) == 3:
        out_flat = ops.qkv_expand(y, lora.lora_b, batch, out_flat, sizes[0], sizes[1], in_place=in_place)
    elif len(sizes) == 2:
        out_flat = ops.gate_up_expand(y, lora.lora_b, batch, out_flat, in_place=in_place)
    else:
        out_flat = ops.sgmv_expand(y, lora.lora_b, batch, out_flat, [0, sizes[0]], in_place=in_place)
    return out_flat.view(out.shape)


# Measured on an H100 (decode step, 8 Llama-3-8B layers, bench_results/NOTES.md): the side
# stream saves 0.7-3.3 % of a step at 1-128 tokens and costs 0.9-2.8 % at 256, where the GEMMs
# fill the GPU and the shrink only competes with them.
OVERLAP_MAX_TOKENS = 128
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(x: torch.Tensor, pool: AdapterPool) -> torch.cuda.Stream | None:
    """The device's LoRA side stream where the shrink may overlap the base GEMM, else None."""
    if (not (pool.overlap_shrink and x.is_cuda) or math.prod(x.shape[:-1]) > OVERLAP_MAX_TOKENS
            or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not torch.cuda.is_current_stream_capturing()):
        return None
    device = x.device
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class LoRALinear(nn.Module):
    """``base(x)`` plus the pool's LoRA of the module at path ``name``.

    ``slice_sizes`` splits the output for an already-fused projection (see ``LoRAQKVLinear``,
    ``LoRAGateUpLinear``); ``slice_names`` are the paths of the unfused modules whose adapters
    fill each slice.
    """

    def __init__(self, base: nn.Linear, pool: AdapterPool, name: str,
                 slice_sizes: Sequence[int] | None = None, slice_names: Sequence[str] = ()):
        super().__init__()
        self.base = base
        self.pool = pool
        self.lora = pool.add_module(name, base.in_features, slice_sizes or [base.out_features], base.weight,
                                    slice_names)

    def active_batch(self, x: torch.Tensor) -> LoRABatch | None:
        return self.pool.active_batch()

    def forward(self, x: torch.Tensor, batch: LoRABatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else self.active_batch(x)
        if batch is None:
            return self.base(x)
        return _lora_forward(lambda: self.base(x), x, self.lora, batch, self.pool)


class LoRAQKVLinear(LoRALinear):
    """A fused q/k/v linear (output ``q_size + 2*kv_size``): one shrink and one ``qkv_expand``."""

    def __init__(self, base: nn.Linear, pool: AdapterPool, name: str, q_size: int, kv_size: int,
                 slice_names: Sequence[str] = ()):
        super().__init__(base, pool, name, [q_size, kv_size, kv_size], slice_names)


class LoRAGateUpLinear(LoRALinear):
    """A fused gate/up linear (two equal halves): one shrink and one ``gate_up_expand``."""

    def __init__(self, base: nn.Linear, pool: AdapterPool, name: str, slice_names: Sequence[str] = ()):
        half = base.out_features // 2
        super().__init__(base, pool, name, [half, half], slice_names)


class LoRALMHead(LoRALinear):
    """An LM head: it may see only the positions whose logits are needed (``logits_to_keep``),
    the last ones of each sequence, and applies LoRA to those with their sequences' adapters."""

    def active_batch(self, x: torch.Tensor) -> LoRABatch | None:
        return self.pool.active_batch(num_tokens=x.numel() // x.shape[-1])


class LoRAEmbedding(nn.Module):
    """``base(ids)`` plus the LoRA of an embedding: ``scaling * B @ A[:, ids]`` (PEFT's
    ``lora_embedding_A (r, vocab)`` and ``lora_embedding_B (dim, r)``)."""

    def __init__(self, base: nn.Embedding, pool: AdapterPool, name: str):
        super().__init__()
        self.base = base
        self.pool = pool
        self.lora = pool.add_module(name, base.num_embeddings, [base.embedding_dim], base.weight, is_embedding=True)

    def forward(self, token_ids: torch.Tensor, batch: LoRABatch | None = None) -> torch.Tensor:
        out = self.base(token_ids)
        batch = batch if batch is not None else self.pool.active_batch()
        if batch is None:
            return out
        y = ops.embedding_a(token_ids.reshape(-1), self.lora.lora_a, batch)
        out_flat = ops.sgmv_expand(y, self.lora.lora_b, batch, out.reshape(-1, out.shape[-1]), [0, out.shape[-1]],
                                   in_place=not torch.is_grad_enabled())
        return out_flat.view(out.shape)


class _MergedProjection:
    """Separate linears (q, k, v or gate, up) computed as one: their outputs concatenated, one
    shrink, one fused expand. The model calls them one by one on the same input, so the first
    call computes every slice and keeps the others for the calls that follow with that input."""

    def __init__(self, bases: Sequence[nn.Linear], lora: ModuleSlots, pool: AdapterPool):
        self.bases = list(bases)
        self.lora = lora
        self.pool = pool
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def slice_output(self, x: torch.Tensor, index: int, batch: LoRABatch) -> torch.Tensor:
        if x is self._input and index in self._pending:
            out = self._pending.pop(index)
            if not self._pending:
                self._input = None
            return out
        fused = _lora_forward(lambda: torch.cat([base(x) for base in self.bases], dim=-1), x, self.lora, batch,
                              self.pool)
        outputs = fused.split(self.lora.slice_sizes, dim=-1)
        self._input = x
        self._pending = {i: out for i, out in enumerate(outputs) if i != index}
        return outputs[index]


class LoRAMergedSlice(nn.Module):
    """One of several separate linears whose LoRA is fused (``merge_linears``): it stands in
    for its linear, which it keeps as ``base``."""

    def __init__(self, base: nn.Linear, merged: _MergedProjection, index: int, pool: AdapterPool):
        super().__init__()
        self.base = base
        self.merged = merged
        self.index = index
        self.pool = pool

    def forward(self, x: torch.Tensor, batch: LoRABatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else self.pool.active_batch()
        return self.base(x) if batch is None else self.merged.slice_output(x, self.index, batch)


def merge_linears(bases: Sequence[nn.Linear], pool: AdapterPool, names: Sequence[str]) -> list[LoRAMergedSlice]:
    """Replacements for separate q/k/v (3, k and v of equal width) or gate/up (2, equal width)
    linears at paths ``names``: their LoRA runs as one shrink and one ``qkv_expand`` /
    ``gate_up_expand``. Put each returned module in place of its linear."""
    sizes = [base.out_features for base in bases]
    fusable = (len(sizes) == 3 and sizes[1] == sizes[2]) or (len(sizes) == 2 and sizes[0] == sizes[1])
    if not fusable or len({base.in_features for base in bases}) != 1:
        raise ValueError(f"merge_linears: {names} need one input width and q/k/v or gate/up output widths, got {sizes}")
    lora = pool.add_module("+".join(names), bases[0].in_features, sizes, bases[0].weight, slice_names=names)
    merged = _MergedProjection(bases, lora, pool)
    return [LoRAMergedSlice(base, merged, index, pool) for index, base in enumerate(bases)]
