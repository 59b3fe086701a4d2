"""Eager host overhead: what one op call costs a caller without CUDA graphs (and an eager prefill).

At 1 token (one sequence, adapter 0, rank 16), back-to-back eager calls are timed with a host
clock after a warm-up, with one synchronise at the end (timing.host_us_per_call). Each call is
reported in microseconds and as a multiple of one torch matmul `x @ W.T`, (1, hidden) x
(hidden, hidden)^T, measured in the same run: the Python API of sgmv_shrink and qkv_expand, and
the raw torch.ops.lora.sgmv_shrink call with exactly the arguments the API passes.
"""

import torch

import lora_ops
from bench_cases import OPS, Case, CaseBatch, OpInputs
from lora_ops.testing import RecordLoraCalls
from timing import first_line, host_us_per_call

HOST_CASE = Case("eager_host_1_token", 1, 1, "single", (16,))  # "single": the sequence uses slot 0


def raw_op_call(api_call):
    """A closure making the one torch.ops.lora.* call that api_call makes, with the same
    arguments (captured once, so this does not depend on the op's schema)."""
    with RecordLoraCalls() as recorder:
        api_call()
    (func, args, kwargs), = recorder.calls
    packet = func.overloadpacket  # torch.ops.lora.<name>, as a user calls it
    return lambda: packet(*args, **kwargs)


def measure_host_overhead(backends, dims, dtype, device, calls):
    """Rows (dicts: case, op, backend, mode, us, x_matmul, note) of the host-overhead table."""
    rank = HOST_CASE.ranks[0]
    case_batch = CaseBatch(HOST_CASE, rank, dims, device, smoke=False)
    shrink = OpInputs(next(op for op in OPS if op.name == "qkv_shrink"), case_batch, dtype)
    expand = OpInputs(next(op for op in OPS if op.name == "qkv_expand"), case_batch, dtype)
    hidden = dims.in_features
    token = torch.randn(1, hidden, device=device, dtype=dtype)
    weight = torch.randn(hidden, hidden, device=device, dtype=dtype)

    def row(op, backend, make_call):
        """make_call() builds the closure to time; building it may fail too (capturing a raw call)."""
        try:
            us, note = host_us_per_call(make_call(), device, calls), ""
        except Exception as e:
            us, note = None, first_line(e)
        return dict(case=HOST_CASE.name, op=op, backend=backend, mode="eager host", us=us,
                    x_matmul=None, note=note)

    # The public functions called directly, not through the op table's closures: nothing but
    # the API's own cost is timed.
    batch, inputs_q, inputs_e = case_batch.batch, shrink.inputs, expand.inputs

    def api_shrink(backend):
        x, A = inputs_q["x"], inputs_q["A"]
        return lambda: lora_ops.sgmv_shrink(x, A, batch, num_slices=3, backend=backend)

    def api_expand(backend):
        y, B, base = inputs_e["y"], inputs_e["B"], inputs_e["base"]
        return lambda: lora_ops.qkv_expand(y, B, batch, base, dims.q_size, dims.kv_size, backend=backend)

    rows = [row(f"torch matmul x @ W.T (1x{hidden} @ {hidden}x{hidden})", "torch", lambda: (lambda: token @ weight.T))]
    for backend in backends:
        rows += [
            row("lora_ops.sgmv_shrink (num_slices=3)", backend, lambda: api_shrink(backend)),
            row("torch.ops.lora.sgmv_shrink (raw, the API's arguments)", backend,
                lambda: raw_op_call(api_shrink(backend))),
            row("lora_ops.qkv_expand", backend, lambda: api_expand(backend)),
        ]
    matmul_us = rows[0]["us"]
    for r in rows:
        if r["us"] is not None and matmul_us:
            r["x_matmul"] = r["us"] / matmul_us
    return rows
