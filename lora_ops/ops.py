"""The op contracts of lora_ops: every ``torch.ops.lora.*`` op, one block each.

A block holds the op's schema, its fake (output shapes for tracing; it runs the same argument
check as the real implementation, so a wrong shape fails while tracing, not at run time), its
implementation (the check, once, then the backend's code) and its typed Python function (which
resolves the backend, checks what needs host values, and calls the op). Importing this module
registers the ops; it must be imported before any graph capture (``import lora_ops`` does it).
Triton kernels are imported lazily, the first time a Triton backend runs.

In plain eager (``_runs_directly``: nothing traces, no dispatch or function mode, no functorch
transform) a Python function runs its op's code itself rather than through ``torch.ops.lora``,
whose call into a Python kernel costs more host time than a whole matmul call. Its check is one
test of everything the function and the op would check (``checks.*_call_ok``), less what the
``LoRABatch`` guarantees (its metadata tensors were checked when it was built); when that test
fails the usual checks run and name the problem. An in-place expand bumps ``base_output``'s
version as the op's ``Tensor(a!)`` would. ``torch.compile``, FakeTensor, ``make_fx`` and user
modes see the op.

Conventions shared by every op and every backend:

- Shrink weights ``A (L, n*R, in)``: slice ``i`` of slot ``l`` in rows ``[i*R, i*R + r_l)``.
  Expand weights ``B (L, out, R)``: columns ``[:r_l]``. Embedding weights ``A (L, R, vocab)``.
- ``R`` (max rank) comes from the weight shapes; ``r_l`` (rank per slot, 0 = unused) from
  ``adapter_rank``. Tokens whose ``token_adapter`` is -1 get no LoRA.
- The scaling ``c_l`` is applied in the expand ops, never in shrink.
- Shrink returns ``y`` with zeros beyond each adapter's rank and for tokens without adapter.
- Expand ops add into ``base_output`` in place (``Tensor(a!)``) and return nothing.
- The metadata tensors come from a ``LoRABatch`` (``batch.op_metadata(plan)``); ``backend`` and
  ``kernel`` are a resolved decision (``lora_ops.dispatch.resolve``), never ``auto``.
- Training (the last section): the five ops above are the inference path and have no autograd
  kernel (a Python one costs every call ~5 us of host time); with inputs that require grad they
  raise (``checks.check_no_grad``). Each has a differentiable, functional twin
  (``lora::sgmv_shrink_autograd``, ``lora::sgmv_expand_autograd`` for the three expand ops,
  ``lora::embedding_a_autograd``) with its backward registered by ``torch.library.register_autograd``;
  the Python functions run the twin when autograd must record the call (grad mode on and an input
  requires grad), so only training pays for autograd. The expand twin is out of place
  (``register_autograd`` refuses mutating ops): it returns ``base_output + delta``, and the
  in-place functions copy that into ``base_output`` (``in_place=False`` returns it without the copy).
"""

from __future__ import annotations

import functools

import torch

from . import checks, torch_native
from .batch import LoRABatch
from .dispatch import resolve

_METADATA = ("Tensor token_adapter, Tensor token_order, Tensor chunk_adapter, Tensor chunk_start, "
             "Tensor chunk_len, Tensor adapter_rank")

SCHEMAS = {
    "sgmv_shrink": (f"sgmv_shrink(Tensor x, Tensor weights, {_METADATA}, int num_slices, "
                    "int chunk_size, str backend, str kernel) -> Tensor"),
    "sgmv_expand": (f"sgmv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                    "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, str backend, "
                    "str kernel) -> ()"),
    "qkv_expand": (f"qkv_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                   "Tensor adapter_scaling, SymInt q_size, SymInt kv_size, int chunk_size, "
                   "str backend, str kernel) -> ()"),
    "gate_up_expand": (f"gate_up_expand(Tensor(a!) base_output, Tensor y, Tensor weights, {_METADATA}, "
                       "Tensor adapter_scaling, int chunk_size, str backend, str kernel) -> ()"),
    "embedding_a": ("embedding_a(Tensor token_ids, Tensor weights, Tensor token_adapter, "
                    "Tensor adapter_rank, str backend) -> Tensor"),
    # training: the differentiable twins (functional) and the ops of their backward formulas
    "sgmv_shrink_autograd": (f"sgmv_shrink_autograd(Tensor x, Tensor weights, {_METADATA}, int num_slices, "
                             "int chunk_size, str backend, str kernel) -> Tensor"),
    "sgmv_expand_autograd": (f"sgmv_expand_autograd(Tensor base_output, Tensor y, Tensor weights, {_METADATA}, "
                             "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, str backend, "
                             "str kernel) -> Tensor"),
    "embedding_a_autograd": ("embedding_a_autograd(Tensor token_ids, Tensor weights, Tensor token_adapter, "
                             "Tensor adapter_rank, str backend) -> Tensor"),
    "sgmv_shrink_grad_x": (f"sgmv_shrink_grad_x(Tensor grad_y, Tensor weights, {_METADATA}, int num_slices, "
                           "int chunk_size, str backend, str kernel) -> Tensor"),
    "sgmv_shrink_grad_weights": (f"sgmv_shrink_grad_weights(Tensor grad_y, Tensor x, {_METADATA}, "
                                 "int num_slices, int chunk_size, str backend, str kernel) -> Tensor"),
    "sgmv_expand_grad_y": (f"sgmv_expand_grad_y(Tensor grad_out, Tensor weights, {_METADATA}, "
                           "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, str backend, "
                           "str kernel) -> Tensor"),
    "sgmv_expand_grad_weights": (f"sgmv_expand_grad_weights(Tensor grad_out, Tensor y, {_METADATA}, "
                                 "Tensor adapter_scaling, SymInt[] slice_offsets, int chunk_size, "
                                 "str backend, str kernel) -> Tensor"),
    "embedding_a_grad_weights": ("embedding_a_grad_weights(Tensor grad_y, Tensor token_ids, "
                                 "Tensor token_adapter, Tensor adapter_rank, SymInt vocab_size, "
                                 "str backend) -> Tensor"),
}

_lib = torch.library.Library("lora", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))


def _register(name: str, fake, impl) -> None:
    torch.library.register_fake(f"lora::{name}", fake, lib=_lib)
    for device in ("CPU", "CUDA"):
        _lib.impl(name, impl, device)


@functools.cache
def _triton_kernels():
    """The Triton kernel modules, imported on first use (cached: an import statement costs
    host time on every call)."""
    import csrc_triton.embedding
    import csrc_triton.expand
    import csrc_triton.grad
    import csrc_triton.shrink

    return csrc_triton


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _runs_directly(*tensors) -> bool:
    """Whether a Python function may run its op's code itself instead of calling the op (see the
    module docstring): not while torch.compile or torch.jit trace, under a dispatch or function
    mode (FakeTensorMode, make_fx, a user's mode: they must see the op) or a functorch transform,
    for plain tensors only, and not when autograd must record the call (the op's differentiable
    twin runs). (The dispatcher's call into a Python kernel costs about 6 us of host time on a
    CPU where a whole matmul call costs 2-3.)"""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None):
        return False
    grad_mode = torch.is_grad_enabled()
    for tensor in tensors:  # a loop, not all(...): a generator costs about 1 us more
        if type(tensor) not in _PLAIN_TENSOR_TYPES or grad_mode and tensor.requires_grad:
            return False
    return True


def _records_grad(*tensors) -> bool:
    """Whether autograd must record the call: the op's differentiable twin runs instead."""
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ---- sgmv_shrink ------------------------------------------------------------------------------


def _shrink_fake(x, weights, *args):
    checks.check_shrink_args("sgmv_shrink", x, weights, *args)
    checks.check_no_grad("sgmv_shrink", x, weights)
    return x.new_empty(x.shape[0], weights.shape[1])


def _shrink_impl(x, weights, *args):
    checks.check_no_grad("sgmv_shrink", x, weights)
    return _run_shrink("sgmv_shrink", x, weights, *args)


def _run_shrink(op, x, weights, *args, float_dtypes=checks.FLOAT_DTYPES):
    checks.check_shrink_args(op, x, weights, *args, float_dtypes)
    return _shrink_kernels(x, weights, *args)


def _shrink_kernels(x, weights, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len,
                    adapter_rank, num_slices, chunk_size, backend, kernel):
    if backend == "torch_native":
        return torch_native.sgmv_shrink(x, weights, token_adapter, adapter_rank, num_slices)
    shrink = _triton_kernels().shrink
    if kernel == "per_token":
        return shrink.launch_per_token(x, weights, token_adapter, adapter_rank, num_slices)
    return shrink.launch_chunk(x, weights, token_order, chunk_adapter, chunk_start, chunk_len,
                               adapter_rank, num_slices, chunk_size, permuted=backend == "csgmv")


_register("sgmv_shrink", _shrink_fake, _shrink_impl)


def sgmv_shrink(
    x: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    num_slices: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """LoRA A for every token with its own adapter: ``y[t, i*R:i*R+r] = x[t] @ A[a(t), i*R:i*R+r].T``.

    Args:
        x: ``(s, in)`` activations, float16/bfloat16/float32.
        weights: ``(L, num_slices*R, in)`` stacked A matrices, ``x``'s dtype and device.
        batch: the forward's ``LoRABatch`` (``s`` tokens, ``L`` slots).
        num_slices: slices stacked in ``weights`` (3 for q/k/v, 2 for gate/up).
        backend: ``torch_native``, ``triton``, ``csgmv``, ``auto``, or None for the
            ``use_backend`` default (``auto`` unless set).

    Returns:
        ``y (s, num_slices*R)``, zero beyond each adapter's rank and for tokens without adapter.
    """
    op = "sgmv_shrink"
    if _runs_directly(x, weights) and checks.shrink_call_ok(x, weights, batch, num_slices):
        decision = resolve(op, batch, weights, backend)
        return _shrink_kernels(x, weights, *batch.op_metadata(decision.plan), num_slices, batch.chunk_size,
                               decision.backend, decision.kernel)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_num_slices(op, num_slices, weights)
    checks.check_rank(op, batch, weights.shape[1] // num_slices, "weights.shape[1] // num_slices")
    decision = resolve(op, batch, weights, backend)
    shrink = torch.ops.lora.sgmv_shrink_autograd if _records_grad(x, weights) else torch.ops.lora.sgmv_shrink
    return shrink(x, weights, *batch.op_metadata(decision.plan), num_slices, batch.chunk_size,
                  decision.backend, decision.kernel)


# ---- the expand ops: sgmv_expand, qkv_expand, gate_up_expand ---------------------------------


def _run_expand(op, base_output, y, weights, *args, float_dtypes=checks.FLOAT_DTYPES,
                in_place=True) -> torch.Tensor:
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = args
    args = (*metadata, adapter_scaling, [int(offset) for offset in slice_offsets], chunk_size, backend, kernel)
    checks.check_expand_args(op, base_output, y, weights, *args, float_dtypes)
    return _expand_kernels(base_output, y, weights, *args, in_place=in_place)


def _expand_kernels(base_output, y, weights, token_adapter, token_order, chunk_adapter, chunk_start,
                    chunk_len, adapter_rank, adapter_scaling, slice_offsets, chunk_size, backend, kernel,
                    in_place=True) -> torch.Tensor:
    """Adds the LoRA delta into base_output and returns it, or (``in_place`` False) returns a
    new contiguous tensor base_output + delta."""
    if backend != "torch_native" and kernel == "chunk":  # out of place in one pass: base read, out written
        out = None if in_place else torch.empty_like(base_output, memory_format=torch.contiguous_format)
        _triton_kernels().expand.launch_chunk(y, weights, base_output, token_order, chunk_adapter, chunk_start,
                                              chunk_len, adapter_rank, adapter_scaling, slice_offsets,
                                              chunk_size, permuted=backend == "csgmv", out=out)
        return base_output if in_place else out
    out = base_output if in_place else base_output.clone(memory_format=torch.contiguous_format)
    if backend == "torch_native":
        torch_native.sgmv_expand(out, y, weights, token_adapter, adapter_rank, adapter_scaling, slice_offsets)
    else:
        _triton_kernels().expand.launch_per_token(y, weights, out, token_adapter, adapter_rank, adapter_scaling,
                                                  slice_offsets)
    return out


# Each expand op's args after (base_output, y, weights): the 6 metadata tensors,
# adapter_scaling, its slice arguments, chunk_size, backend, kernel.
def _expand_fake(base_output, y, weights, *args):
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = args
    checks.check_expand_args("sgmv_expand", base_output, y, weights, *metadata, adapter_scaling,
                             slice_offsets, chunk_size, backend, kernel)
    checks.check_no_grad("sgmv_expand", base_output, y, weights)


def _expand_impl(base_output, y, weights, *args):
    checks.check_no_grad("sgmv_expand", base_output, y, weights)
    _run_expand("sgmv_expand", base_output, y, weights, *args)


def _qkv_expand_args(base_output, args):
    *metadata, adapter_scaling, q_size, kv_size, chunk_size, backend, kernel = args
    offsets = checks.qkv_offsets("qkv_expand", base_output, q_size, kv_size)
    return (*metadata, adapter_scaling, offsets, chunk_size, backend, kernel)


def _qkv_expand_fake(base_output, y, weights, *args):
    checks.check_expand_args("qkv_expand", base_output, y, weights, *_qkv_expand_args(base_output, args))
    checks.check_no_grad("qkv_expand", base_output, y, weights)


def _qkv_expand_impl(base_output, y, weights, *args):
    checks.check_no_grad("qkv_expand", base_output, y, weights)
    _run_expand("qkv_expand", base_output, y, weights, *_qkv_expand_args(base_output, args))


def _gate_up_expand_args(base_output, args):
    *metadata, adapter_scaling, chunk_size, backend, kernel = args
    offsets = checks.gate_up_offsets("gate_up_expand", base_output)
    return (*metadata, adapter_scaling, offsets, chunk_size, backend, kernel)


def _gate_up_expand_fake(base_output, y, weights, *args):
    checks.check_expand_args("gate_up_expand", base_output, y, weights,
                             *_gate_up_expand_args(base_output, args))
    checks.check_no_grad("gate_up_expand", base_output, y, weights)


def _gate_up_expand_impl(base_output, y, weights, *args):
    checks.check_no_grad("gate_up_expand", base_output, y, weights)
    _run_expand("gate_up_expand", base_output, y, weights, *_gate_up_expand_args(base_output, args))


_register("sgmv_expand", _expand_fake, _expand_impl)
_register("qkv_expand", _qkv_expand_fake, _qkv_expand_impl)
_register("gate_up_expand", _gate_up_expand_fake, _gate_up_expand_impl)


def _expand(op: str, y, weights, batch: LoRABatch, base_output, backend, slice_args: tuple,
            in_place: bool, slice_offsets) -> torch.Tensor:
    """Shared by the expand functions: in plain eager the op's code directly; else host checks,
    the decision, then the op named ``op`` (under autograd or out of place, the differentiable
    twin). ``slice_offsets()`` gives the offsets, checked."""
    if in_place and _runs_directly(base_output, y, weights) and base_output.dim() == 2:
        offsets = slice_offsets()
        if checks.expand_call_ok(base_output, y, weights, batch, len(offsets) - 1):
            decision = resolve(op, batch, weights, backend)
            torch.autograd.graph.increment_version(base_output)  # as the op's Tensor(a!) would
            return _expand_kernels(base_output, y, weights, *batch.op_metadata(decision.plan), batch.adapter_scaling,
                                   offsets, batch.chunk_size, decision.backend, decision.kernel)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_rank(op, batch, weights.shape[2], "weights.shape[2]")
    decision = resolve(op, batch, weights, backend)
    metadata = batch.op_metadata(decision.plan)
    if not in_place or _records_grad(base_output, y, weights):
        out = torch.ops.lora.sgmv_expand_autograd(base_output, y, weights, *metadata, batch.adapter_scaling,
                                                  slice_offsets(), batch.chunk_size, decision.backend,
                                                  decision.kernel)
        return base_output.copy_(out) if in_place else out
    getattr(torch.ops.lora, op)(base_output, y, weights, *metadata, batch.adapter_scaling, *slice_args,
                                batch.chunk_size, decision.backend, decision.kernel)
    return base_output


def sgmv_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    slice_offsets: list[int],
    backend: str | None = None,
    *,
    in_place: bool = True,
) -> torch.Tensor:
    """LoRA B, added in place: ``base_output[t, o_i:o_{i+1}] += c * y[t, i*R:i*R+r] @ B[a(t), o_i:o_{i+1}, :r].T``.

    Args:
        y: ``(s, n*R)`` shrink output, ``n = len(slice_offsets) - 1``.
        weights: ``(L, out, R)`` stacked B matrices.
        batch: the forward's ``LoRABatch``.
        base_output: ``(s, out)`` output of the base layer, updated in place.
        slice_offsets: ``[0, o_1, ..., out]``, strictly increasing, 1 to 3 slices: slice ``i`` is
            columns ``[o_i, o_{i+1})`` of ``base_output`` and rows of ``weights``.
        backend: as in ``sgmv_shrink``.
        in_place: False leaves ``base_output`` unchanged and returns a new tensor (the training
            form: under autograd the in-place form computes that too, then copies it into
            ``base_output``, one more pass over it).

    Returns:
        ``base_output`` (updated), or the new tensor when ``in_place`` is False.
    """
    op, slice_offsets = "sgmv_expand", list(slice_offsets)

    def checked_offsets():  # a base_output of another rank fails the op's check, with its message
        if base_output.dim() != 2:
            return slice_offsets
        return checks.check_slice_offsets(op, slice_offsets, base_output.shape[1])

    return _expand(op, y, weights, batch, base_output, backend, (slice_offsets,), in_place, checked_offsets)


def qkv_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    q_size: int,
    kv_size: int,
    backend: str | None = None,
    *,
    in_place: bool = True,
) -> torch.Tensor:
    """``sgmv_expand`` with the three slices q, k, v of widths ``q_size, kv_size, kv_size``.

    Shapes: ``y (s, 3R)``, ``weights (L, q_size + 2*kv_size, R)``, ``base_output (s, q_size + 2*kv_size)``.
    """
    op = "qkv_expand"
    return _expand(op, y, weights, batch, base_output, backend, (q_size, kv_size), in_place,
                   lambda: checks.qkv_offsets(op, base_output, q_size, kv_size))


def gate_up_expand(
    y: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    base_output: torch.Tensor,
    backend: str | None = None,
    *,
    in_place: bool = True,
) -> torch.Tensor:
    """``sgmv_expand`` with two equal slices (gate, up).

    Shapes: ``y (s, 2R)``, ``weights (L, 2*inter, R)``, ``base_output (s, 2*inter)``.
    """
    op = "gate_up_expand"
    return _expand(op, y, weights, batch, base_output, backend, (), in_place,
                   lambda: checks.gate_up_offsets(op, base_output))


# ---- embedding_a ------------------------------------------------------------------------------


def _embedding_a_fake(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_embedding_args("embedding_a", token_ids, weights, token_adapter, adapter_rank, backend)
    checks.check_no_grad("embedding_a", weights)
    return weights.new_empty(token_ids.shape[0], weights.shape[1])


def _embedding_a_impl(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_no_grad("embedding_a", weights)
    return _run_embedding_a("embedding_a", token_ids, weights, token_adapter, adapter_rank, backend)


def _run_embedding_a(op, token_ids, weights, token_adapter, adapter_rank, backend,
                     float_dtypes=checks.FLOAT_DTYPES):
    checks.check_embedding_args(op, token_ids, weights, token_adapter, adapter_rank, backend, float_dtypes)
    return _embedding_a_kernels(token_ids, weights, token_adapter, adapter_rank, backend)


def _embedding_a_kernels(token_ids, weights, token_adapter, adapter_rank, backend):
    if backend == "torch_native":
        return torch_native.embedding_a(token_ids, weights, token_adapter, adapter_rank)
    return _triton_kernels().embedding.launch(token_ids, weights, token_adapter, adapter_rank)


_register("embedding_a", _embedding_a_fake, _embedding_a_impl)


def embedding_a(
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    batch: LoRABatch,
    backend: str | None = None,
) -> torch.Tensor:
    """LoRA A of an embedding: ``y[t, :r] = A[a(t), :r, token_ids[t]]``.

    Args:
        token_ids: ``(s,)`` int32/int64 token ids in ``[0, vocab)`` (checked eagerly, outside
            ``torch.compile``, CUDA-graph capture and dispatch modes such as make_fx).
        weights: ``(L, R, vocab)``.
        batch: the forward's ``LoRABatch``.

    Returns:
        ``y (s, R)`` in the weights' dtype, zero beyond each rank and for tokens without adapter.
    """
    op = "embedding_a"
    if _runs_directly(token_ids, weights) and checks.embedding_call_ok(token_ids, weights, batch):
        checks.check_token_ids_in_range(op, token_ids, weights.shape[2])
        decision = resolve(op, batch, weights, backend)
        return _embedding_a_kernels(token_ids, weights, batch.token_adapter, batch.adapter_rank, decision.backend)
    checks.check_tensor(op, "token_ids", token_ids, 1, dtypes=checks.INDEX_DTYPES)
    checks.check_tensor(op, "weights", weights, 3)
    checks.check_rank(op, batch, weights.shape[1], "weights.shape[1]")
    checks.check_token_ids_in_range(op, token_ids, weights.shape[2])
    decision = resolve(op, batch, weights, backend)
    embed = torch.ops.lora.embedding_a_autograd if _records_grad(weights) else torch.ops.lora.embedding_a
    return embed(token_ids, weights, batch.token_adapter, batch.adapter_rank, decision.backend)


# ---- training: the differentiable twins and their backward formulas ----------------------------
#
# The backward formulas, in one place (the twins' forwards are the ops above; r = the slot's rank,
# c its scaling; scalings and batch metadata are constants, tokens without adapter and slots of
# rank 0 get no gradient, nothing past a slot's rank does):
#
#   shrink  y[t, i*R:i*R+r] = x[t] @ A[a, i*R:i*R+r].T
#       dx[t]                  = sum_i dy[t, i*R:i*R+r] @ A[a, i*R:i*R+r]       (sgmv_shrink_grad_x)
#       dA[l, i*R:i*R+r]       = dy_l[:, i*R:i*R+r].T @ x_l                     (sgmv_shrink_grad_weights)
#   expand  out[t, cols_i] = base[t, cols_i] + c * y[t, i*R:i*R+r] @ B[a, cols_i, :r].T
#       dbase                  = dout                                             (passes through)
#       dy[t, i*R:i*R+r]       = c * dout[t, cols_i] @ B[a, cols_i, :r]           (sgmv_expand_grad_y)
#       dB[l, cols_i, :r]      = c * dout_l[:, cols_i].T @ y_l[:, i*R:i*R+r]      (sgmv_expand_grad_weights)
#   embedding  y[t, :r] = A[a, :r, ids[t]]
#       dA[a, :r, ids[t]]     += dy[t, :r]                                        (embedding_a_grad_weights)
#
# where x_l, dy_l, dout_l are the rows of the tokens of slot l. torch_native computes them one
# adapter at a time; the Triton backends in csrc_triton/grad.py. The gradient ops are internal:
# the backward formulas call them with the forward's (checked) arguments.


# The twins' arguments end with (..., backend, kernel), the embedding's with backend.
def _shrink_autograd_fake(x, weights, *args):
    checks.check_shrink_args("sgmv_shrink_autograd", x, weights, *args, checks.twin_dtypes(args[-2]))
    return x.new_empty(x.shape[0], weights.shape[1])


def _shrink_autograd_impl(x, weights, *args):
    return _run_shrink("sgmv_shrink_autograd", x, weights, *args, float_dtypes=checks.twin_dtypes(args[-2]))


def _expand_autograd_fake(base_output, y, weights, *args):
    checks.check_expand_args("sgmv_expand_autograd", base_output, y, weights, *args, checks.twin_dtypes(args[-2]))
    return base_output.new_empty(base_output.shape)


def _expand_autograd_impl(base_output, y, weights, *args):
    return _run_expand("sgmv_expand_autograd", base_output, y, weights, *args,
                       float_dtypes=checks.twin_dtypes(args[-2]), in_place=False)


def _embedding_a_autograd_fake(token_ids, weights, token_adapter, adapter_rank, backend):
    checks.check_embedding_args("embedding_a_autograd", token_ids, weights, token_adapter, adapter_rank, backend,
                                checks.twin_dtypes(backend))
    return weights.new_empty(token_ids.shape[0], weights.shape[1])


def _embedding_a_autograd_impl(token_ids, weights, token_adapter, adapter_rank, backend):
    return _run_embedding_a("embedding_a_autograd", token_ids, weights, token_adapter, adapter_rank, backend,
                            checks.twin_dtypes(backend))


_register("sgmv_shrink_autograd", _shrink_autograd_fake, _shrink_autograd_impl)
_register("sgmv_expand_autograd", _expand_autograd_fake, _expand_autograd_impl)
_register("embedding_a_autograd", _embedding_a_autograd_fake, _embedding_a_autograd_impl)


def _matmul_gradient_impl(name: str):
    """The impl of the gradient op ``name``, for every backend: ``torch_native.<name>`` (per-token
    ids and ranks) or ``csrc_triton.grad.<name>`` (the plan too); both take the op's own arguments
    (``num_slices``, or ``adapter_scaling`` and ``slice_offsets``) after the metadata."""

    def impl(gradient, tensor, *args):
        *inputs, chunk_size, backend, kernel = [list(map(int, arg)) if isinstance(arg, (list, tuple)) else arg
                                                for arg in args]  # SymInt[] slice offsets as ints
        token_adapter, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank, *own_args = inputs
        if backend == "torch_native":
            return getattr(torch_native, name)(gradient, tensor, token_adapter, adapter_rank, *own_args)
        return getattr(_triton_kernels().grad, name)(
            gradient, tensor, token_adapter, token_order, chunk_adapter, chunk_start, chunk_len, adapter_rank,
            *own_args, chunk_size, permuted=backend == "csgmv", per_token=kernel == "per_token")

    return impl


def _embedding_a_grad_weights_impl(grad_y, token_ids, token_adapter, adapter_rank, vocab_size, backend):
    if backend == "torch_native":
        return torch_native.embedding_a_grad_weights(grad_y, token_ids, token_adapter, adapter_rank, vocab_size)
    return _triton_kernels().grad.embedding_grad_weights(grad_y, token_ids, token_adapter, adapter_rank, vocab_size)


# Fakes of the gradient ops: each gradient has its input's shape.
def _shrink_grad_x_fake(grad_y, weights, *args):
    return grad_y.new_empty(grad_y.shape[0], weights.shape[2])


def _shrink_grad_weights_fake(grad_y, x, *args):
    *metadata, num_slices, chunk_size, backend, kernel = args
    adapter_rank = metadata[-1]
    return x.new_empty(adapter_rank.shape[0], grad_y.shape[1], x.shape[1])


def _expand_grad_y_fake(grad_out, weights, *args):
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = args
    return grad_out.new_empty(grad_out.shape[0], (len(slice_offsets) - 1) * weights.shape[2])


def _expand_grad_weights_fake(grad_out, y, *args):
    *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = args
    return y.new_empty(adapter_scaling.shape[0], grad_out.shape[1], y.shape[1] // (len(slice_offsets) - 1))


def _embedding_a_grad_weights_fake(grad_y, token_ids, token_adapter, adapter_rank, vocab_size, backend):
    return grad_y.new_empty(adapter_rank.shape[0], grad_y.shape[1], vocab_size)


_register("sgmv_shrink_grad_x", _shrink_grad_x_fake, _matmul_gradient_impl("sgmv_shrink_grad_x"))
_register("sgmv_shrink_grad_weights", _shrink_grad_weights_fake, _matmul_gradient_impl("sgmv_shrink_grad_weights"))
_register("sgmv_expand_grad_y", _expand_grad_y_fake, _matmul_gradient_impl("sgmv_expand_grad_y"))
_register("sgmv_expand_grad_weights", _expand_grad_weights_fake, _matmul_gradient_impl("sgmv_expand_grad_weights"))
_register("embedding_a_grad_weights", _embedding_a_grad_weights_fake, _embedding_a_grad_weights_impl)


def _shrink_setup_context(ctx, inputs, output):
    x, weights, *metadata, num_slices, chunk_size, backend, kernel = inputs
    ctx.save_for_backward(x, weights, *metadata)
    ctx.args = (num_slices, chunk_size, backend, kernel)


def _shrink_backward(ctx, grad_y):
    x, weights, *metadata = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    needs_x, needs_weights = ctx.needs_input_grad[:2]
    grad_x = torch.ops.lora.sgmv_shrink_grad_x(grad_y, weights, *metadata, *ctx.args) if needs_x else None
    grad_w = torch.ops.lora.sgmv_shrink_grad_weights(grad_y, x, *metadata, *ctx.args) if needs_weights else None
    return grad_x, grad_w, *[None] * (len(metadata) + len(ctx.args))


def _expand_setup_context(ctx, inputs, output):
    base_output, y, weights, *metadata, adapter_scaling, slice_offsets, chunk_size, backend, kernel = inputs
    ctx.save_for_backward(y, weights, *metadata, adapter_scaling)
    ctx.args = (slice_offsets, chunk_size, backend, kernel)


def _expand_backward(ctx, grad_out):
    y, weights, *metadata = ctx.saved_tensors  # metadata ends with adapter_scaling
    grad_out = grad_out.contiguous()
    needs_base, needs_y, needs_weights = ctx.needs_input_grad[:3]
    grad_y = torch.ops.lora.sgmv_expand_grad_y(grad_out, weights, *metadata, *ctx.args) if needs_y else None
    grad_w = torch.ops.lora.sgmv_expand_grad_weights(grad_out, y, *metadata, *ctx.args) if needs_weights else None
    return grad_out if needs_base else None, grad_y, grad_w, *[None] * (len(metadata) + len(ctx.args))


def _embedding_a_setup_context(ctx, inputs, output):
    token_ids, weights, token_adapter, adapter_rank, backend = inputs
    ctx.save_for_backward(token_ids, token_adapter, adapter_rank)
    ctx.args = (weights.shape[2], backend)


def _embedding_a_backward(ctx, grad_y):
    token_ids, token_adapter, adapter_rank = ctx.saved_tensors
    grad_w = torch.ops.lora.embedding_a_grad_weights(grad_y.contiguous(), token_ids, token_adapter, adapter_rank,
                                                     *ctx.args)
    return None, grad_w, None, None, None


torch.library.register_autograd("lora::sgmv_shrink_autograd", _shrink_backward,
                                setup_context=_shrink_setup_context, lib=_lib)
torch.library.register_autograd("lora::sgmv_expand_autograd", _expand_backward,
                                setup_context=_expand_setup_context, lib=_lib)
torch.library.register_autograd("lora::embedding_a_autograd", _embedding_a_backward,
                                setup_context=_embedding_a_setup_context, lib=_lib)
