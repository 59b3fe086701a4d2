"""The benchmark's cases: model shapes, batch shapes, and the inputs of one op on one batch.

The ops themselves (input builders, calls, float64 and low-precision references) are the rows
of ``lora_ops.testing.OP_CASES``, the table the tests use; this file only names the four
projections the bench times and picks the batch shapes.
"""

import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

import roofline
from lora_ops.testing import OP_CASES, Dims, OpCase, Scenario, error_and_bound, make_batch

NUM_SLOTS = 8

LLAMA3_8B = Dims(in_features=4096, q_size=4096, kv_size=1024, intermediate=14336)
SMOKE_DIMS = Dims(in_features=128, q_size=128, kv_size=32, intermediate=192)


# ----------------------------------------------------------------------------- batch shapes

@dataclass(frozen=True)
class Case:
    name: str
    num_seqs: int
    seq_len: int
    adapters: str  # "random": uniform over the slots; "skewed": 90% on one slot; "single": one slot
    ranks: tuple  # ranks run by default (all adapters in a case share the rank)

    @property
    def tokens(self):
        return self.num_seqs * self.seq_len

    @property
    def target(self):
        """The performance target this case is judged by (from its full-size shape)."""
        if self.seq_len == 1 and self.tokens <= 256:
            return "decode"
        if self.tokens >= 2048:
            return "prefill"
        return None


CASES = [
    Case("prefill_4x2048", 4, 2048, "random", (16, 64)),
    Case("decode_1", 1, 1, "random", (16, 64)),
    Case("decode_32", 32, 1, "random", (16, 64)),
    Case("decode_256", 256, 1, "random", (16, 64)),
    Case("skewed_256", 256, 1, "skewed", (16,)),
    Case("skewed_2048", 32, 64, "skewed", (16,)),
    Case("skewed_8192", 128, 64, "skewed", (16,)),
    Case("single_2048", 32, 64, "single", (16,)),
    Case("uniform_2048", 32, 64, "random", (16,)),
]


def sequence_adapters(case, num_seqs, rng):
    """Adapter slot per sequence for the case's distribution."""
    if case.adapters == "single":
        return [0] * num_seqs
    if case.adapters == "skewed":  # slot 0 holds 90% of the sequences, the rest random among others
        hot = round(0.9 * num_seqs)
        ids = np.concatenate([np.zeros(hot, int), rng.integers(1, NUM_SLOTS, num_seqs - hot)])
        return rng.permutation(ids).tolist()
    return rng.integers(0, NUM_SLOTS, num_seqs).tolist()


def case_scenario(case, rank, smoke, seed=0):
    """The case as a test Scenario: sequence lengths, adapter per sequence, one rank for all slots.

    The numpy generator and its seed draw the same adapters as every earlier version of the
    bench, so before/after runs time the same batches."""
    rng = np.random.default_rng(seed)
    num_seqs, seq_len = case.num_seqs, case.seq_len
    if smoke:
        num_seqs, seq_len = min(num_seqs, 4), min(seq_len, 8)
    adapters = sequence_adapters(case, num_seqs, rng)
    return Scenario(f"{case.name} r{rank}", (seq_len,) * num_seqs, tuple(adapters), (rank,) * NUM_SLOTS)


def select(names, wanted, what):
    """Filter by exact name or prefix (e.g. 'decode' selects every decode case)."""
    if not wanted:
        return names
    chosen = [n for n in names if any(n == w or n.startswith(w) for w in wanted)]
    if not chosen:
        sys.exit(f"no {what} matches {wanted}; choose from {names}")
    return chosen


# ----------------------------------------------------------------------------- the timed ops

@dataclass(frozen=True)
class BenchOp:
    name: str  # the report's name for the projection
    op_case: OpCase  # the tests' row: builder, calls, reference
    num_slices: int

    @property
    def is_shrink(self):
        return self.op_case.name.startswith("shrink")


_OP_CASES = {case.name: case for case in OP_CASES}
OPS = [
    BenchOp("qkv_shrink", _OP_CASES["shrink_3slice"], 3),
    BenchOp("qkv_expand", _OP_CASES["qkv_expand"], 3),
    BenchOp("gate_up_shrink", _OP_CASES["shrink_2slice"], 2),
    BenchOp("gate_up_expand", _OP_CASES["gate_up_expand"], 2),
]
OP_NAMES = [op.name for op in OPS]


class CaseBatch:
    """One case at one rank: the batch metadata, shared by every op and backend."""

    def __init__(self, case, rank, dims, device, smoke):
        scenario = case_scenario(case, rank, smoke)
        self.label = scenario.name
        self.rank = rank
        self.dims = replace(dims, max_rank=rank)
        self.batch = make_batch(scenario, device=device)
        with_adapter = [(n, a) for n, a in zip(scenario.seq_lens, scenario.adapter_ids) if a >= 0]
        self.tokens_with_adapter = sum(n for n, _ in with_adapter)
        self.active_adapters = len({a for _, a in with_adapter})


class OpInputs:
    """Random inputs of one op on one case, drawn on the device (the tests' builder)."""

    def __init__(self, op, case_batch, dtype, seed=0):
        device = case_batch.batch.device
        self.op, self.case_batch, self.dtype = op, case_batch, dtype
        self.inputs = op.op_case.build(case_batch.batch, case_batch.dims, dtype,
                                       torch.Generator(device).manual_seed(seed))
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()

    def work(self):
        """Minimum bytes and flops of the op on this batch (the roofline's model)."""
        cb, op = self.case_batch, self.op
        if op.is_shrink:
            return roofline.shrink_work(cb.tokens_with_adapter, cb.active_adapters, cb.rank,
                                        cb.dims.in_features, op.num_slices, self.elem_bytes)
        return roofline.expand_work(cb.tokens_with_adapter, cb.active_adapters, cb.rank,
                                    self.inputs["offsets"][-1], op.num_slices, self.elem_bytes)

    def check(self, backend, references):
        """'ok', or why the backend's result is wrong: the tests' error rule against float64."""
        ref64, ref_lowp = references
        result = self.op.op_case.run(self.inputs, self.case_batch.batch, backend)
        if result.shape != ref64.shape:
            return f"shape {tuple(result.shape)} != {tuple(ref64.shape)}"
        err, bound = error_and_bound(result, ref64, ref_lowp)
        if err == float("inf"):
            return "non-finite output"
        return "ok" if err <= bound else f"err {err:.3g} > bound {bound:.3g}"

    def references(self):
        """(float64 reference, the same math by torch in the inputs' dtype)."""
        reference, batch = self.op.op_case.reference, self.case_batch.batch
        return reference(self.inputs, batch, torch.float64), reference(self.inputs, batch, self.dtype)

    def call(self, backend):
        """A zero-argument closure making the op call as a model does (expand accumulates)."""
        run, inputs, batch = self.op.op_case.run_in_place, self.inputs, self.case_batch.batch
        return lambda: run(inputs, batch, backend)

    def dense_call(self):
        """One dense GEMM of the op's shape over all tokens, as cuBLAS runs it for one adapter:
        shrink x @ A[0].T, (s, in) x (in, n*R); expand base += y @ W.T, (s, n*R) x (n*R, out)."""
        inputs = self.inputs
        if self.op.is_shrink:
            x, weight = inputs["x"], inputs["A"][0]
            return lambda: x @ weight.T
        y, base, B = inputs["y"], inputs["base"], inputs["B"]
        out_width, inner = base.shape[1], y.shape[1]
        # B's first out*n*R elements seen as one dense (out, n*R) weight: no extra memory.
        weight = B.reshape(-1)[: out_width * inner].view(out_width, inner)
        return lambda: base.addmm_(y, weight.T)
