"""Benchmark of the multi-LoRA ops against the roofline and the ANCHORS.md numbers.

Run from the repository root:   PYTHONPATH=. python python/bench.py [--cases ...] [--smoke]

One invocation measures the copy bandwidth and the bf16 matmul rate, then every case x rank x
op x backend: the batch and inputs are built once per case, the op is warmed up (compiling the
Triton kernels), captured in a CUDA graph and timed over graph replays with CUDA events. A
backend that raises is reported as n/a with its reason; one that cannot be captured (host
syncs) is timed eagerly and marked `eager`. Results go to bench_results/<device>.{md,csv,png}
and, when $OUT is set, to $OUT as well. `--smoke` runs tiny shapes on the CPU (perf_counter
timing, no graphs) to exercise every code path.

Note: graph replays do not flush L2, so cases whose bytes fit in L2 (decode) can beat the
DRAM roofline; the anchors were measured the same way.
"""

import argparse
import csv
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402  (python/roofline.py, beside this file)

import lora_ops  # noqa: E402

NUM_SLOTS = 8
SCALING = 2.0
CALLS_PER_GRAPH = 20  # op calls captured back to back in one timed graph
TIME_BUDGET_S = 210  # default: leaves headroom under the 5-minute limit for start-up and reports


# ----------------------------------------------------------------------------- model shapes

@dataclass(frozen=True)
class Dims:
    hidden: int
    q: int
    kv: int
    intermediate: int


LLAMA3_8B = Dims(hidden=4096, q=4096, kv=1024, intermediate=14336)
SMOKE_DIMS = Dims(hidden=128, q=128, kv=32, intermediate=192)


# ----------------------------------------------------------------------------- the case table

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


# ----------------------------------------------------------------------------- the op table

@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # "shrink" or "expand"
    num_slices: int
    projection: str  # "qkv" or "gate_up"

    def out_width(self, dims, rank):
        if self.kind == "shrink":
            return self.num_slices * rank
        return dims.q + 2 * dims.kv if self.projection == "qkv" else 2 * dims.intermediate

    def work(self, dims, tokens, active_adapters, rank, elem_bytes):
        if self.kind == "shrink":
            return roofline.shrink_work(tokens, active_adapters, rank, dims.hidden,
                                        self.num_slices, elem_bytes)
        return roofline.expand_work(tokens, active_adapters, rank, self.out_width(dims, rank),
                                    self.num_slices, elem_bytes)


OPS = [
    Op("qkv_shrink", "shrink", 3, "qkv"),
    Op("qkv_expand", "expand", 3, "qkv"),
    Op("gate_up_shrink", "shrink", 2, "gate_up"),
    Op("gate_up_expand", "expand", 2, "gate_up"),
]


class CaseInputs:
    """Batch metadata and random inputs of one case, built once and shared by every op/backend."""

    def __init__(self, case, rank, dims, dtype, device, smoke, seed=0):
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        num_seqs, seq_len = case.num_seqs, case.seq_len
        if smoke:
            num_seqs, seq_len = min(num_seqs, 4), min(seq_len, 8)
        seq_lens = [seq_len] * num_seqs
        seq_adapters = sequence_adapters(case, num_seqs, rng)
        self.dims, self.rank, self.device = dims, rank, device
        self.tokens = sum(seq_lens)
        self.tokens_with_adapter = sum(n for n, a in zip(seq_lens, seq_adapters) if a >= 0)
        self.active_adapters = len({a for a in seq_adapters if a >= 0})
        self.elem_bytes = torch.empty((), dtype=dtype).element_size()
        self.batch = lora_ops.LoRABatch.build(seq_lens, seq_adapters, [rank] * NUM_SLOTS,
                                              [SCALING] * NUM_SLOTS, device=device)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

        s, h, r, L = self.tokens, dims.hidden, rank, NUM_SLOTS
        # Scales keep y and the LoRA delta near unit size, so repeated in-place replays stay finite.
        self.x = randn(s, h)
        self.A = {"qkv": randn(L, 3 * r, h, scale=h ** -0.5), "gate_up": randn(L, 2 * r, h, scale=h ** -0.5)}
        self.y = {"qkv": randn(s, 3 * r), "gate_up": randn(s, 2 * r)}
        self.B = {"qkv": randn(L, dims.q + 2 * dims.kv, r, scale=0.5 * r ** -0.5),
                  "gate_up": randn(L, 2 * dims.intermediate, r, scale=0.5 * r ** -0.5)}
        # Timing accumulates into base_output replay after replay; checks start from a pristine copy.
        self.base = {"qkv": randn(s, dims.q + 2 * dims.kv), "gate_up": randn(s, 2 * dims.intermediate)}
        self.pristine_base = {p: b.clone() for p, b in self.base.items()}

    def call(self, op, backend, base_output=None):
        """A zero-argument closure running op once; expand accumulates into base_output."""
        p, batch = op.projection, self.batch
        if op.kind == "shrink":
            x, A = self.x, self.A[p]
            return lambda: lora_ops.sgmv_shrink(x, A, batch, num_slices=op.num_slices, backend=backend)
        y, B = self.y[p], self.B[p]
        out = self.base[p] if base_output is None else base_output
        if p == "qkv":
            q, kv = self.dims.q, self.dims.kv
            return lambda: lora_ops.qkv_expand(y, B, batch, out, q_size=q, kv_size=kv, backend=backend)
        return lambda: lora_ops.gate_up_expand(y, B, batch, out, backend=backend)

    def result(self, op, backend):
        """One eager call on fresh buffers: shrink's y, or expand's delta added to the base output."""
        if op.kind == "shrink":
            return self.call(op, backend)().float()
        base = self.pristine_base[op.projection]
        out = base.clone()
        self.call(op, backend, base_output=out)()
        return out.float() - base.float()


def check(result, reference, tolerance):
    """'ok', or the relative error norm against the torch_native result when it is too large."""
    if result.shape != reference.shape:
        return f"shape {tuple(result.shape)} != {tuple(reference.shape)}"
    err = ((result - reference).norm() / reference.norm().clamp_min(1e-30)).item()
    if not np.isfinite(err) or err > tolerance:
        return f"rel err {err:.3g}"
    return "ok"


# ----------------------------------------------------------------------------- timing

def time_op(fn, device, allow_graph=True, target_us=2000.0):
    """Median microseconds per call of fn, and how it ran: 'graph', 'eager' (+ why) or 'cpu'.

    On a GPU: warm up on a side stream (compiles Triton kernels), capture one call in a CUDA
    graph, then time batches of replays between CUDA event pairs and take the median; a capture
    failure falls back to eager calls timed the same way. On a CPU: perf_counter, no graph.
    """
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples), "cpu"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    run, mode, graph = fn, "eager (backend declares it is not graph-capturable)", None
    calls_per_run = 1
    if allow_graph:
        try:
            # Many calls in one graph, as in a model's step graph: one call per graph would time
            # the graph launch (~5 us) instead of the op.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(CALLS_PER_GRAPH):
                    fn()
            run, mode, calls_per_run = graph.replay, "graph", CALLS_PER_GRAPH
        except Exception as e:  # data-dependent host syncs cannot be captured
            graph = None
            mode = f"eager (capture failed: {first_line(e)})"
            torch.cuda.synchronize()

    def elapsed_us(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (runs * calls_per_run)

    estimate = elapsed_us(1) * calls_per_run
    runs = int(max(1, min(20, target_us // max(estimate, 1e-3))))
    repeats = 15 if estimate < 1000 else 5
    us = statistics.median(elapsed_us(runs) for _ in range(repeats))
    del graph
    return us, mode


def graph_safe(backend):
    """Whether to try a CUDA-graph capture: not for backends that declare host syncs."""
    info = getattr(lora_ops, "BACKEND_INFO", {}).get(backend)
    return getattr(info, "cuda_graph_safe", True)


def first_line(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:120]


# ----------------------------------------------------------------------------- anchors

ANCHORS_SOURCE = ("/work/shared/ANCHORS.md: one H200, copy bandwidth 2.72 TB/s, CUDA-graph replay; "
                  "cells in op order qkv shrink / qkv expand / gate-up shrink / gate-up expand")
OP_ORDER = [op.name for op in OPS]
ANCHORS = {  # (case, rank) -> unit, {library: four cells}
    ("prefill_4x2048", 16): ("% copy roofline", {
        "vLLM 0.33": (36, 19, 49, 28), "SGLang 0.5.23 triton": (47, 28, 59, 70),
        "SGLang csgmv": (47, 19, 57, 19)}),
    ("prefill_4x2048", 64): ("% copy roofline", {
        "vLLM 0.33": (11, 18, 16, 27), "SGLang 0.5.23 triton": (14, 11, 19, 14),
        "SGLang csgmv": (14, 10, 19, 10)}),
    ("decode_1", 16): ("us", {
        "vLLM 0.33": (5.5, 7.9, 4.6, 13.8), "SGLang 0.5.23 triton": (8.5, 3.2, 8.5, 4.1),
        "SGLang csgmv": (10.8, 2.6, 10.9, 3.2)}),
    ("decode_256", 64): ("us", {
        "vLLM 0.33": (17.1, 28.7, 14.4, 84.5), "SGLang 0.5.23 triton": (20.4, 36.7, 22.7, 97.0),
        "SGLang csgmv": (15.7, 38.6, 13.2, 184.0)}),
}


def best_anchor(case, rank, op_name):
    """(value, library, unit) of the best anchor for this cell, or None."""
    if (case, rank) not in ANCHORS:
        return None
    unit, libraries = ANCHORS[(case, rank)]
    i = OP_ORDER.index(op_name)
    pick = max if unit.startswith("%") else min
    library = pick(libraries, key=lambda lib: libraries[lib][i])
    return libraries[library][i], library, unit


# ----------------------------------------------------------------------------- the benchmark

def run_case(case, rank, ops, backends, dims, dtype, device, smoke, rates):
    """Rows (dicts) for every op x backend of one case at one rank."""
    copy_bw, mm_rate = rates
    inputs = CaseInputs(case, rank, dims, dtype, device, smoke)
    label = f"{case.name} r{rank}"
    tolerance = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    rows = []
    for op in ops:
        work = op.work(dims, inputs.tokens_with_adapter, inputs.active_adapters, rank, inputs.elem_bytes)
        roof_us, copy_us = roofline.roofline_us(work, copy_bw, mm_rate)
        try:
            reference = inputs.result(op, "torch_native")
        except Exception as e:
            reference, ref_error = None, first_line(e)
        op_rows = []
        for backend in backends:
            row = dict(case=label, op=op.name, backend=backend, mode="", us=None, gbps=None,
                       roofline_us=roof_us, copy_roofline_us=copy_us, pct_roofline=None,
                       pct_copy=None, speedup=None, target="", verdict="", check="", note="")
            try:
                result = inputs.result(op, backend)
                row["check"] = (check(result, reference, tolerance) if reference is not None
                                else f"no reference ({ref_error})")
                del result
                us, mode = time_op(inputs.call(op, backend), device, graph_safe(backend))
            except Exception as e:
                row.update(mode="n/a", note=first_line(e))
                try:  # drain work of the failed call; a sticky CUDA error will show in later rows
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                except Exception:
                    pass
                op_rows.append(row)
                print(f"  {label:20s} {op.name:15s} {backend:13s} n/a: {row['note']}", flush=True)
                continue
            if mode.startswith("eager ("):
                mode, row["note"] = "eager", mode[len("eager ("):-1]
            row.update(mode=mode, us=us, gbps=work.bytes / us / 1e3,
                       pct_roofline=100 * roof_us / us, pct_copy=100 * copy_us / us)
            row["target"], row["verdict"] = verdict(case.target, us, roof_us, row["check"])
            op_rows.append(row)
            print(f"  {label:20s} {op.name:15s} {backend:13s} {us:10.1f} us ({mode}) "
                  f"{row['pct_roofline']:5.1f}% roofline {row['pct_copy']:5.1f}% copy  "
                  f"{row['verdict'] or '-'}  check {row['check']}", flush=True)
        native = [r["us"] for r in op_rows if r["backend"] == "torch_native" and r["us"]]
        for row in op_rows:
            if native and row["us"]:
                row["speedup"] = native[0] / row["us"]
        rows += op_rows
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def verdict(target, us, roof_us, check_result):
    """(target text, 'pass' / 'FAIL' / 'WRONG' / '') for the case's target; wrong results never pass."""
    if target == "decode":
        limit = 2 * roof_us + 3.0
        text, met = f"<= {limit:.1f} us", us <= limit
    elif target == "prefill":
        text, met = ">= 75% roofline", roof_us / us >= 0.75
    else:
        text, met = "", None
    if check_result != "ok":
        return text, "WRONG"
    return text, "" if met is None else "pass" if met else "FAIL"


# ----------------------------------------------------------------------------- the report

COLUMNS = [  # (key, header, format)
    ("case", "case", "{}"), ("op", "op", "{}"), ("backend", "backend", "{}"), ("mode", "mode", "{}"),
    ("us", "time us", "{:.1f}"), ("gbps", "GB/s", "{:.0f}"), ("roofline_us", "roofline us", "{:.2f}"),
    ("copy_roofline_us", "copy roofline us", "{:.2f}"),
    ("pct_roofline", "% roofline", "{:.1f}"), ("pct_copy", "% copy roofline", "{:.1f}"),
    ("speedup", "x torch_native", "{:.2f}"), ("target", "target", "{}"), ("verdict", "verdict", "{}"),
    ("check", "check", "{}"), ("note", "note", "{}"),
]


def fmt(value, pattern):
    return "" if value is None or value == "" else pattern.format(value)


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


ANCHOR_COPY_BW = 2.72e12  # bytes/s: the copy bandwidth the anchors' percentages are relative to


def anchor_time_us(pct_of_copy_roofline, row):
    """An anchor's % of its copy roofline as microseconds, with our byte model for the case.

    The anchors' 2.72 TB/s is what a copy captured in a CUDA graph (a copy-engine memcpy)
    reaches on an H200; our roofline uses a copy kernel (~4.2 TB/s there), so comparing
    percentages would flatter the anchors: compare times instead."""
    case_bytes = row["gbps"] * row["us"] * 1e3
    return case_bytes / ANCHOR_COPY_BW * 1e6 / (pct_of_copy_roofline / 100)


def anchor_rows(rows, backends):
    """One row per anchored cell: best anchor, and each backend's value and whether it beats it."""
    table = []
    by_key = {(r["case"], r["op"], r["backend"]): r for r in rows}
    for (case, rank), (unit, _) in ANCHORS.items():
        for op_name in OP_ORDER:
            label = f"{case} r{rank}"
            if not any(k[0] == label and k[1] == op_name for k in by_key):
                continue
            value, library, unit = best_anchor(case, rank, op_name)
            cells = [label, op_name, f"{value:g} {unit} ({library})"]
            for backend in backends:
                r = by_key.get((label, op_name, backend))
                if r is None or r["us"] is None:
                    cells.append("n/a")
                    continue
                anchor_us = value if unit == "us" else anchor_time_us(value, r)
                beats = r["us"] < anchor_us
                cells.append(f"{r['us']:.1f} us vs {anchor_us:.1f} us {'beats' if beats else 'no'}"
                             + ("" if r["check"] == "ok" else " (WRONG)"))
            table.append(cells)
    return table


def report(rows, header_lines, backends, out_stem, plot=True):
    """Print the tables and write <out_stem>.md / .csv (and .png); copy them to $OUT if set."""
    headers = [h for _, h, _ in COLUMNS]
    body = [[fmt(r[k], f) for k, _, f in COLUMNS] for r in rows]
    main_table = markdown_table(headers, body)
    anchors = markdown_table(["case", "op", "best anchor"] + list(backends), anchor_rows(rows, backends))
    text = "\n".join(["# lora_ops benchmark", ""] + [f"- {line}" for line in header_lines] + [
        "", "## Results", "", main_table, "",
        "## Against the anchors", "", f"Source: {ANCHORS_SOURCE}. "
        "Prefill anchors are given as % of a 2.72 TB/s copy roofline and are converted to microseconds "
        "with our byte model; every cell compares times (lower is better). The anchors ran on an H200: "
        "compare with care on another card.",
        "", anchors, ""])
    print("\n" + text, flush=True)

    os.makedirs(os.path.dirname(out_stem) or ".", exist_ok=True)
    with open(out_stem + ".md", "w") as f:
        f.write(text)
    write_csv(rows, out_stem + ".csv")
    paths = [out_stem + ".md", out_stem + ".csv"]
    if plot:
        try:
            paths.append(plot_roofline(rows, backends, out_stem + ".png", title=header_lines[0]))
        except Exception as e:
            print(f"plot failed: {first_line(e)}", flush=True)
    if os.environ.get("OUT"):
        for path in paths:
            shutil.copy(path, os.environ["OUT"])
    return paths


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def plot_roofline(rows, backends, path, title=""):
    """% of roofline per case, one panel per op, bars grouped by backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.9 * len(cases) * len(backends) / 2), 3.2 * len(ops)),
                             squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, op_name in zip(axes[:, 0], ops):
        for j, backend in enumerate(backends):
            values = []
            for case in cases:
                match = [r for r in rows if r["case"] == case and r["op"] == op_name and r["backend"] == backend]
                values.append((match[0]["pct_roofline"] or 0.0) if match else 0.0)
            ax.bar(np.arange(len(cases)) + (j - (len(backends) - 1) / 2) * width, values, width, label=backend)
        ax.axhline(75, color="gray", linestyle="--", linewidth=0.8, label="prefill target 75%")
        ax.set_title(op_name)
        ax.set_ylabel("% of roofline")
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def device_short_name(device):
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    match = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ----------------------------------------------------------------------------- main

def select(names, wanted, what):
    """Filter by exact name or prefix (e.g. 'decode' selects every decode case)."""
    if not wanted:
        return names
    chosen = [n for n in names if any(n == w or n.startswith(w) for w in wanted)]
    if not chosen:
        sys.exit(f"no {what} matches {wanted}; choose from {names}")
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", help=f"names or prefixes of {[c.name for c in CASES]}")
    parser.add_argument("--ops", nargs="+", help=f"names or prefixes of {OP_ORDER}")
    parser.add_argument("--backends", nargs="+", help="default: lora_ops.BACKENDS (torch_native only with --smoke)")
    parser.add_argument("--ranks", nargs="+", type=int, help="run every selected case at these ranks "
                        "(default: 16 and 64 for prefill/decode, 16 for the rest)")
    parser.add_argument("--time-budget", type=float, default=TIME_BUDGET_S,
                        help="seconds; cases not started by then are skipped and listed")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32, no CUDA graphs")
    parser.add_argument("--out-dir", default="bench_results")
    args = parser.parse_args()

    t_start = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: full-size cases need a GPU; use --smoke for the CPU check")
    device = torch.device("cpu" if args.smoke else "cuda")
    dims, dtype = (SMOKE_DIMS, torch.float32) if args.smoke else (LLAMA3_8B, torch.bfloat16)
    cases = [c for c in CASES if c.name in select([c.name for c in CASES], args.cases, "case")]
    ops = [o for o in OPS if o.name in select(OP_ORDER, args.ops, "op")]
    all_backends = list(getattr(lora_ops, "BACKENDS", ("torch_native", "triton", "csgmv")))
    backends = args.backends or (["torch_native"] if args.smoke else all_backends)

    if args.smoke:
        rates = (roofline.measure_copy_bandwidth(device, 1 << 24, repeats=3),
                 roofline.measure_matmul_rate(device, 256, torch.float32, repeats=3))
    else:
        rates = (roofline.measure_copy_bandwidth(device), roofline.measure_matmul_rate(device))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    short = device_short_name(device) + ("-smoke" if args.smoke else "")
    header = [
        f"device: {device_name}" + (" (smoke: tiny shapes, float32, perf_counter timing)" if args.smoke else ""),
        f"torch {torch.__version__}, triton {_triton_version()}, dtype {str(dtype).replace('torch.', '')}",
        f"copy bandwidth: {rates[0] / 1e12:.3f} TB/s (device-to-device copy, read + write, median)",
        f"matmul rate: {rates[1] / 1e12:.1f} TFLOP/s ({'256^3 fp32' if args.smoke else '8192^3 bf16'}, median)",
        f"shapes: hidden {dims.hidden}, q {dims.q}, kv {dims.kv}, intermediate {dims.intermediate}; "
        f"{NUM_SLOTS} adapter slots, scaling {SCALING}",
        "roofline = max(bytes / copy bw, flops / matmul rate); copy roofline = bytes / copy bw; "
        "targets: decode <= 2x roofline + 3 us, prefill >= 75% of roofline",
        f"timing: CUDA graphs of {CALLS_PER_GRAPH} back-to-back calls, replays between CUDA events, median per call; 'eager' = not capturable, "
        "timed as eager calls; no L2 flush between replays",
    ]
    for line in header:
        print(line, flush=True)
    out_stem = os.path.join(args.out_dir, short)

    rows, skipped = [], []
    for case in cases:
        for rank in (args.ranks or case.ranks):
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_budget:
                skipped.append(f"{case.name} r{rank}")
                continue
            print(f"[{elapsed:6.1f}s] {case.name} rank {rank}", flush=True)
            try:
                rows += run_case(case, rank, ops, backends, dims, dtype, device, args.smoke, rates)
            except Exception as e:  # building the batch failed: report and go on
                print(f"  {case.name} r{rank}: case failed: {first_line(e)}", flush=True)
                skipped.append(f"{case.name} r{rank} (failed: {first_line(e)})")
            write_csv(rows, out_stem + ".csv")  # after every case, so a run cut short keeps its rows
            if os.environ.get("OUT"):
                shutil.copy(out_stem + ".csv", os.environ["OUT"])

    if skipped:
        header.append(f"skipped (time budget {args.time_budget:.0f} s or failure): {', '.join(skipped)}")
    header.append(f"total time: {time.perf_counter() - t_start:.0f} s")
    paths = report(rows, header, backends, out_stem)
    print("wrote " + ", ".join(paths) + (f" (and copied to {os.environ['OUT']})" if os.environ.get("OUT") else ""),
          flush=True)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
