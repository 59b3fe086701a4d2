"""An adapter pool: fixed slots of stacked LoRA weights for every wrapped module of a model.

Each wrapped module registers its buffers here (``add_module``): ``A (L, n*R, in)`` and
``B (L, out, R)`` for ``L = max_adapters`` slots at ``R = max_rank``, in the module's dtype and
on its device. ``load`` writes an adapter into one slot of every buffer in place, so a model
already compiled or captured in a CUDA graph keeps working.

Per-module rank and scaling: adapters may give each module its own rank and alpha (PEFT's
``rank_pattern`` / ``alpha_pattern``), but a ``LoRABatch`` holds one rank and one scaling per
slot. So the pool folds each module's scaling into its B when loading, and gives the batch
scaling 1 and, as the slot's rank, the largest rank of the adapter's modules; a module of lower
rank has zeros in its rows and columns beyond its rank, so it gets exactly its own rank's math.

For CUDA graphs and ``torch.compile``, ``empty_batch`` gives a fixed-capacity ``LoRABatch`` that
reads the pool's own per-slot rank tensor, which ``load`` and ``evict`` change in place: a
captured graph or compiled model serves newly loaded adapters with their ranks.

Training: ``AdapterPool(..., trainable=True)`` makes every module's stacked A and B leaves that
require grad (``pool.parameters()``, for an optimizer; the base model stays frozen), so each
token of a mixed batch trains its own adapter. ``new_adapter`` starts one as PEFT does (A
Kaiming-uniform, B zero), ``save`` writes one back as a PEFT adapter directory, dividing each
module's scaling back out of B. B is trained with the scaling folded in (``c * B``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .batch import LoRABatch
from .peft import AdapterError, ModuleLoRA, adapter_modules, lora_config, read_checkpoint, write_checkpoint

NO_ADAPTER = "__base__"


@dataclass
class ModuleSlots:
    """The stacked LoRA weights of one wrapped module, one slot per adapter."""

    lora_a: torch.Tensor  # (L, n*R, in); an embedding's (L, R, vocab)
    lora_b: torch.Tensor  # (L, out, R), scaling folded in
    slice_sizes: list[int]  # output widths of the n slices (q, k, v / gate, up / one)
    is_embedding: bool

    @property
    def slice_offsets(self) -> list[int]:
        offsets = [0]
        for size in self.slice_sizes:
            offsets.append(offsets[-1] + size)
        return offsets


class _Request:
    """The adapter slot of each sequence, for the forwards inside ``AdapterPool.adapters``."""

    def __init__(self, pool: AdapterPool, seq_slots: list[int], follows_input: bool):
        self.pool = pool
        self.seq_slots = seq_slots
        self.follows_input = follows_input  # sequence i is row i of each forward's input
        self.batch: LoRABatch | None = None
        self.layout = None  # (token slots, sequence end offsets) the batch was built for
        self._tails: dict[int, LoRABatch] = {}

    def lay_out(self, token_slots: torch.Tensor, seq_ends: list[int]) -> None:
        self.layout = (token_slots, seq_ends)
        self.batch = self.pool._batch_of_tokens(token_slots)
        self._tails = {}
        self.tail_batch(len(seq_ends))  # built now: generate() keeps one logit per sequence

    def lay_out_rows(self, rows: int, length: int) -> None:
        """Layout of a ``(rows, length)`` input, sequence i in row i; kept while the shape is."""
        if len(self.seq_slots) != rows:
            raise ValueError(f"{len(self.seq_slots)} adapter names for an input of {rows} rows")
        if self.batch is None or self.batch.num_tokens != rows * length:
            slots = torch.tensor(self.seq_slots).repeat_interleave(length)
            self.lay_out(slots, [length * (row + 1) for row in range(rows)])

    def tail_batch(self, num_tokens: int) -> LoRABatch:
        """The batch of the last ``num_tokens / num_seqs`` tokens of each sequence: what an LM
        head that computes only the needed logits (``logits_to_keep``) receives."""
        if num_tokens == self.batch.num_tokens:
            return self.batch
        if num_tokens not in self._tails:
            token_slots, seq_ends = self.layout
            keep = num_tokens // len(seq_ends)
            starts = [0, *seq_ends[:-1]]
            kept = torch.cat([torch.arange(max(start, end - keep), end) for start, end in zip(starts, seq_ends)])
            self._tails[num_tokens] = self.pool._batch_of_tokens(token_slots[kept])
        return self._tails[num_tokens]


class AdapterPool:
    """Fixed adapter slots shared by every LoRA layer of a model.

    Typical use: ``pool = AdapterPool(max_adapters=4, max_rank=16)``,
    ``patch_model(model, pool)``, ``pool.load("name", "path/to/peft_adapter")``, then run the
    model inside ``with pool.adapters(["name", None, ...]):``.
    """

    def __init__(self, max_adapters: int, max_rank: int, trainable: bool = False, overlap_shrink: bool = True):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters and max_rank must be positive, got {max_adapters}, {max_rank}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.trainable = trainable
        self.overlap_shrink = overlap_shrink  # captured graphs: shrink on a side stream beside the base GEMM
        # adapter name -> (its config, {module: its ModuleLoRA as loaded}): what save writes back
        self._loaded: dict[str, tuple[Mapping, dict[str, ModuleLoRA]]] = {}
        self.modules: dict[str, ModuleSlots] = {}
        # adapter module path -> (pool module, slice index or None for the whole module)
        self._targets: dict[str, tuple[ModuleSlots, int | None]] = {}
        self._slots: dict[str, int] = {}
        self._slot_rank = [0] * max_adapters
        # per-slot rank and scaling (1: folded into B) on self.device, once empty_batch needs them
        self._slot_rank_tensor: torch.Tensor | None = None
        self._unit_scalings: torch.Tensor | None = None
        self._request: _Request | None = None
        self.device: torch.device | None = None

    # ---- modules (called by the layers when a model is patched) ----

    def add_module(self, name: str, in_features: int, slice_sizes: Sequence[int], weight: torch.Tensor,
                   slice_names: Sequence[str] = (), is_embedding: bool = False) -> ModuleSlots:
        """Buffers for the module at path ``name`` with output slices ``slice_sizes``, in the
        dtype and on the device of its base ``weight``. ``slice_names``: paths whose adapters
        fill one slice each (e.g. ``q_proj``, ``k_proj``, ``v_proj`` of a fused qkv)."""
        if self._slots:
            raise RuntimeError("patch the model before loading adapters: loaded adapters lack the new module")
        if self.device is not None and weight.device != self.device:
            raise ValueError(f"{name} is on {weight.device}, the pool's other modules on {self.device}")
        self.device = weight.device
        make = dict(dtype=weight.dtype, device=weight.device, requires_grad=self.trainable)
        slots = ModuleSlots(
            lora_a=torch.zeros(self.max_adapters, len(slice_sizes) * self.max_rank, in_features, **make),
            lora_b=torch.zeros(self.max_adapters, sum(slice_sizes), self.max_rank, **make),
            slice_sizes=list(slice_sizes), is_embedding=is_embedding,
        )
        self.modules[name] = slots
        self._targets[name] = (slots, None)
        for index, slice_name in enumerate(slice_names):
            self._targets[slice_name] = (slots, index)
        return slots

    # ---- adapters ----

    @property
    def adapter_names(self) -> dict[str, int]:
        """Loaded adapters and their slots."""
        return dict(self._slots)

    def load(self, name: str, adapter: str | os.PathLike | Mapping[str, torch.Tensor], config=None) -> int:
        """Load an adapter into a free slot (or its own slot again, if ``name`` is loaded).

        Args:
            name: the name requests use to pick it.
            adapter: a PEFT adapter directory, or a state dict with PEFT's key names
                (``...q_proj.lora_A.weight``) together with ``config``.
            config: the adapter's ``LoraConfig`` or its dict (``adapter_config.json``), when
                ``adapter`` is a state dict.

        Everything is read and checked before the pool changes: on any error it is unchanged.
        A per-step batch built before holds the slot's old rank: build a new one (a new ``adapters``
        block); a fixed-capacity batch (``empty_batch``) follows it in place.
        """
        if isinstance(adapter, (str, os.PathLike)):
            config, adapter = read_checkpoint(adapter)
        elif config is None:
            raise AdapterError(f"load({name!r}): a state dict needs config= (LoraConfig or adapter_config.json dict)")
        modules = adapter_modules(config, adapter)
        writes = [self._checked_target(module, lora) for module, lora in modules.items()]
        slot = self._slots.get(name)
        if slot is None:
            free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
            if not free:
                raise AdapterError(f"load({name!r}): all {self.max_adapters} slots are taken; evict one first")
            slot = free[0]
        with torch.no_grad():
            for slots in self.modules.values():  # modules the adapter does not target contribute nothing
                slots.lora_a[slot].zero_()
                slots.lora_b[slot].zero_()
            for slots, index, lora in writes:
                self._write(slots, index, lora, slot)
        self._slots[name] = slot
        self._set_slot_rank(slot, max(lora.rank for _, _, lora in writes))
        self._loaded[name] = (config, modules)
        return slot

    def evict(self, name: str) -> None:
        """Free ``name``'s slot; the next ``load`` may reuse it."""
        self._set_slot_rank(self._slot(name), 0)
        del self._slots[name]
        del self._loaded[name]

    # ---- training ----

    def parameters(self) -> list[torch.Tensor]:
        """Every module's stacked A and B (all slots): what an optimizer trains (``trainable=True``)."""
        return [tensor for slots in self.modules.values() for tensor in (slots.lora_a, slots.lora_b)]

    def new_adapter(self, name: str, r: int, lora_alpha: float, generator: torch.Generator | None = None) -> int:
        """Load a fresh adapter of rank ``r`` on every module, initialised as PEFT does (A
        Kaiming-uniform, B zero; embeddings A zero, B normal), to train. Modules fused by
        ``merge_linears`` get one adapter per slice (``q_proj``, ``k_proj``, ...). Returns its slot."""
        state = {}
        for module, slots in self.modules.items():
            slice_names = [path for path, (target, index) in self._targets.items() if target is slots and index is not None]
            fused_by_merge = "+" in module  # merge_linears names the fused module by its slices
            for i, path in enumerate(slice_names if fused_by_merge else [module]):
                width = slots.slice_sizes[i] if fused_by_merge else slots.lora_b.shape[1]
                fan_in = slots.lora_a.shape[2]
                if slots.is_embedding:
                    lora_a, lora_b = torch.zeros(r, fan_in), torch.randn(width, r, generator=generator)
                else:
                    lora_a = (torch.rand(r, fan_in, generator=generator) * 2 - 1) / fan_in**0.5
                    lora_b = torch.zeros(width, r)
                key = "lora_embedding_{}" if slots.is_embedding else "lora_{}.weight"
                state[f"{path}.{key.format('A')}"], state[f"{path}.{key.format('B')}"] = lora_a, lora_b
        modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
        return self.load(name, state, lora_config(r, lora_alpha, modules))

    def save(self, name: str, path: str | os.PathLike) -> None:
        """Write adapter ``name`` (e.g. after training) as a PEFT adapter directory:
        ``adapter_config.json`` and ``adapter_model.safetensors``, each module at its own rank."""
        slot = self._slot(name)
        config, loaded = self._loaded[name]
        modules = {}
        for module, lora in loaded.items():
            slots, index = self._targets[module]
            rank, max_rank = lora.rank, self.max_rank
            slices = range(len(slots.slice_sizes)) if index is None else (index,)
            a_per_slice = [slots.lora_a[slot, i * max_rank : i * max_rank + rank] for i in slices]
            if any(not torch.equal(a, a_per_slice[0]) for a in a_per_slice[1:]):
                raise AdapterError(f"save({name!r}): {module} is one PEFT module whose slices share A, "
                                   "but their A differ now (trained separately)")
            offsets = slots.slice_offsets
            columns = slice(None) if index is None else slice(offsets[index], offsets[index + 1])
            lora_b = slots.lora_b[slot, columns, :rank].float() / lora.scaling
            modules[module] = ModuleLoRA(a_per_slice[0], lora_b.to(slots.lora_b.dtype), lora.scaling, lora.is_embedding)
        write_checkpoint(path, config, modules)

    def _checked_target(self, module: str, lora: ModuleLoRA) -> tuple[ModuleSlots, int | None, ModuleLoRA]:
        if module not in self._targets:
            raise AdapterError(f"adapter targets {module!r}, which no patched module maps "
                               "(patch_model's target_modules, or the model's module names)")
        slots, index = self._targets[module]
        width = slots.lora_b.shape[1] if index is None else slots.slice_sizes[index]
        expected_a = (lora.rank, slots.lora_a.shape[2])
        if lora.is_embedding != slots.is_embedding:
            raise AdapterError(f"{module}: embedding adapter on a linear module or the reverse")
        if lora.rank > self.max_rank:
            raise AdapterError(f"{module}: rank {lora.rank} exceeds the pool's max_rank {self.max_rank}")
        if tuple(lora.lora_a.shape) != expected_a or tuple(lora.lora_b.shape) != (width, lora.rank):
            raise AdapterError(f"{module}: lora_A {tuple(lora.lora_a.shape)} / lora_B {tuple(lora.lora_b.shape)} "
                               f"do not fit the module: expected {expected_a} / {(width, lora.rank)}")
        return slots, index, lora

    def _write(self, slots: ModuleSlots, index: int | None, lora: ModuleLoRA, slot: int) -> None:
        rank, max_rank, offsets = lora.rank, self.max_rank, slots.slice_offsets
        lora_a = lora.lora_a.to(slots.lora_a)
        # An adapter of the whole fused module shares one A between the slices: y_i = x A^T.
        for i in range(len(slots.slice_sizes)) if index is None else (index,):
            slots.lora_a[slot, i * max_rank : i * max_rank + rank] = lora_a
        columns = slice(None) if index is None else slice(offsets[index], offsets[index + 1])
        slots.lora_b[slot, columns, :rank] = (lora.lora_b.float() * lora.scaling).to(slots.lora_b)

    def _slot(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self._slots)})")
        return self._slots[name]

    # ---- choosing adapters per request ----

    def _set_slot_rank(self, slot: int, rank: int) -> None:
        self._slot_rank[slot] = rank
        if self._slot_rank_tensor is not None:  # in place: fixed-capacity batches read it
            self._slot_rank_tensor[slot] = rank

    def slots(self, adapter_names: Sequence[str | None]) -> list[int]:
        """The slot of each adapter name (``None`` or ``"__base__"``: -1, no adapter), for
        ``LoRABatch.update_``'s ``adapter_ids``."""
        return [-1 if name in (None, NO_ADAPTER) else self._slot(name) for name in adapter_names]

    def empty_batch(self, max_tokens: int, max_seqs: int | None = None, chunk_size: int | None = None) -> LoRABatch:
        """A fixed-capacity ``LoRABatch`` for this pool's slots (``LoRABatch.empty``): fill it
        each step with ``batch.update_(seq_lens, pool.slots(names))`` and run the model inside
        ``pool.adapters(batch)``. Its ranks follow ``load`` and ``evict`` in place, and its
        ``max_rank`` is the pool's, so neither a graph nor a compiled model sees them change."""
        if self.device is None:
            raise RuntimeError("empty_batch: patch a model first (the batch lives on the model's device)")
        if self._slot_rank_tensor is None:
            self._slot_rank_tensor = torch.tensor(self._slot_rank, dtype=torch.int32, device=self.device)
            # scalings are folded into B: every slot's batch scaling is 1
            self._unit_scalings = torch.ones(self.max_adapters, dtype=torch.float32, device=self.device)
        return LoRABatch.empty(max_tokens, self._slot_rank_tensor, self._unit_scalings, max_seqs=max_seqs,
                               max_rank=self.max_rank, device=self.device, chunk_size=chunk_size)

    def _batch_of_tokens(self, token_slots: torch.Tensor) -> LoRABatch:
        # Scalings are folded into B, so every slot's batch scaling is 1.
        return LoRABatch.from_token_adapters(token_slots, self._slot_rank, [1.0] * self.max_adapters,
                                             device=self.device)

    def _request_for(self, adapter_names, seq_lens=None, attention_mask=None) -> _Request:
        follows_input = seq_lens is None and attention_mask is None
        request = _Request(self, self.slots(adapter_names), follows_input)
        slots = torch.tensor(request.seq_slots, dtype=torch.int64)
        if seq_lens is not None and attention_mask is not None:
            raise ValueError("give seq_lens or attention_mask, not both")
        if seq_lens is not None:
            if len(seq_lens) != len(adapter_names):
                raise ValueError(f"{len(adapter_names)} adapter names for {len(seq_lens)} sequences")
            lengths = torch.as_tensor(seq_lens, dtype=torch.int64)
            request.lay_out(slots.repeat_interleave(lengths), torch.cumsum(lengths, 0).tolist())
        elif attention_mask is not None:
            rows, length = attention_mask.shape
            if rows != len(adapter_names):
                raise ValueError(f"{len(adapter_names)} adapter names for {rows} rows of attention_mask")
            # padding tokens (mask 0) get no adapter
            token_slots = torch.where(attention_mask.cpu().bool(), slots.unsqueeze(1), -1).flatten()
            request.lay_out(token_slots, [length * (row + 1) for row in range(rows)])
        return request

    def make_batch(self, adapter_names: Sequence[str | None], seq_lens: Sequence[int] | None = None,
                   attention_mask: torch.Tensor | None = None) -> LoRABatch:
        """The ``LoRABatch`` of sequences by adapter name (``None`` or ``"__base__"``: no adapter).

        Give ``seq_lens`` for sequences packed one after another, or an ``attention_mask``
        ``(rows, length)`` for padded rows (padding tokens get no adapter).
        """
        if seq_lens is None and attention_mask is None:
            raise ValueError("make_batch needs seq_lens or attention_mask")
        return self._request_for(adapter_names, seq_lens, attention_mask).batch

    @contextlib.contextmanager
    def adapters(self, adapters: Sequence[str | None] | LoRABatch, seq_lens: Sequence[int] | None = None,
                 attention_mask: torch.Tensor | None = None):
        """Run the patched model's forwards inside this block with these adapters.

        ``adapters``: one adapter name per sequence (``None`` / ``"__base__"``: no adapter), or
        a ``LoRABatch`` used as is. With names and neither ``seq_lens`` nor ``attention_mask``,
        sequence i is row i of each forward's ``(rows, length)`` input: the batch follows the
        input's shape, so ``model.generate()`` works (``patch_model`` installs that hook).
        """
        if isinstance(adapters, LoRABatch):
            request = _Request(self, [], follows_input=False)
            request.batch = adapters
        else:
            request = self._request_for(adapters, seq_lens, attention_mask)
        previous, self._request = self._request, request
        try:
            yield request.batch
        finally:
            self._request = previous

    def active_batch(self, num_tokens: int | None = None) -> LoRABatch | None:
        """The batch of the active ``adapters`` block (None outside one); ``num_tokens`` below
        the batch's picks the batch of the last tokens of each sequence (an LM head's input)."""
        request = self._request
        if request is None:
            return None
        if request.batch is None:
            raise RuntimeError("adapters chosen by name only: their batch is laid out from the input of a model "
                               "patched by patch_model; otherwise pass seq_lens or attention_mask")
        if num_tokens is None or request.layout is None:
            return request.batch
        return request.tail_batch(num_tokens)

    def begin_forward(self, rows: int, length: int) -> None:
        """Lay out a by-row request for a ``(rows, length)`` input (``patch_model``'s hook)."""
        if self._request is not None and self._request.follows_input:
            self._request.lay_out_rows(rows, length)
