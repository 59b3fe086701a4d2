"""Benchmark of the multi-LoRA ops against the roofline, a dense GEMM and the anchors' numbers.

Run from the repository root:   PYTHONPATH=. python python/bench.py [--cases ...] [--smoke]

One invocation measures the eager host overhead per call (host_overhead.py), the copy
bandwidth and the bf16 matmul rate (roofline.py), then every case x rank x op x backend
(bench_cases.py): the batch is built once per case and the inputs once per op; every backend's
result is checked against the float64 reference with the tests' error rule (lora_ops.testing);
then each backend and one dense GEMM of the same shape are warmed up, captured in a CUDA graph
and timed over graph replays (timing.py). A backend that raises is reported as n/a with its
reason; one that cannot be captured (host syncs) is timed eagerly and marked `eager`. Results
go to bench_results/<device>.{md,csv,png} and <device>-host.csv (report.py) and, when $OUT is
set, to $OUT as well. `--smoke` runs tiny shapes in float32 on the CPU (perf_counter timing,
no graphs; Triton backends run in Triton's interpreter) to exercise every code path.
"""

import argparse
import os
import sys
import time

import torch

import lora_ops
import roofline
from bench_cases import CASES, LLAMA3_8B, NUM_SLOTS, OP_NAMES, OPS, SMOKE_DIMS, CaseBatch, OpInputs, select
from host_overhead import measure_host_overhead
from report import COLUMNS, copy_to_out, device_short_name, report, triton_version, write_csv
from timing import CALLS_PER_GRAPH, first_line, graph_safe, time_op

HOST_CALLS = 300  # back-to-back eager calls per host-overhead measurement (10 with --smoke)


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


def check_backends(inputs, backends):
    """{backend: 'ok', why its result is wrong, or the exception it raised}.

    Every backend is checked before any is timed: timing accumulates into the expand ops'
    base output, which the references read."""
    try:
        references = inputs.references()
    except Exception as e:
        return {backend: f"no reference ({first_line(e)})" for backend in backends}
    checks = {}
    for backend in backends:
        try:
            checks[backend] = inputs.check(backend, references)
        except Exception as e:
            checks[backend] = e
    return checks


def run_op(inputs, case, backends, device, rates):
    """Rows (dicts) for one op on one case: every backend, beside one dense GEMM of its shape."""
    label, op_name = inputs.case_batch.label, inputs.op.name
    work = inputs.work()
    roof_us, copy_us = roofline.roofline_us(work, *rates)
    checks = check_backends(inputs, backends)
    try:
        dense_us, _ = time_op(inputs.dense_call(), device)
    except Exception as e:
        dense_us = None
        print(f"  {label:20s} {op_name:15s} dense GEMM n/a: {first_line(e)}", flush=True)

    rows = []
    for backend in backends:
        row = dict(case=label, op=op_name, backend=backend, mode="", us=None, gbps=None,
                   roofline_us=roof_us, copy_roofline_us=copy_us, pct_roofline=None,
                   pct_copy=None, speedup=None, target="", verdict="", check="", note="",
                   dense_us=dense_us, x_dense=None)
        rows.append(row)
        try:
            if isinstance(checks[backend], Exception):
                raise checks[backend]
            row["check"] = checks[backend]
            us, mode = time_op(inputs.call(backend), device, graph_safe(backend))
        except Exception as e:
            row.update(mode="n/a", note=first_line(e))
            try:  # drain work of the failed call; a sticky CUDA error will show in later rows
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception:
                pass
            print(f"  {label:20s} {op_name:15s} {backend:13s} n/a: {row['note']}", flush=True)
            continue
        if mode.startswith("eager ("):
            mode, row["note"] = "eager", mode[len("eager ("):-1]
        row.update(mode=mode, us=us, gbps=work.bytes / us / 1e3,
                   pct_roofline=100 * roof_us / us, pct_copy=100 * copy_us / us,
                   x_dense=us / dense_us if dense_us else None)
        row["target"], row["verdict"] = verdict(case.target, us, roof_us, row["check"])
        dense = f"{row['x_dense']:5.2f}x dense" if dense_us else "dense n/a"
        print(f"  {label:20s} {op_name:15s} {backend:13s} {us:10.1f} us ({mode}) "
              f"{row['pct_roofline']:5.1f}% roofline {row['pct_copy']:5.1f}% copy {dense}  "
              f"{row['verdict'] or '-'}  check {row['check']}", flush=True)
    native = [r["us"] for r in rows if r["backend"] == "torch_native" and r["us"]]
    for row in rows:
        if native and row["us"]:
            row["speedup"] = native[0] / row["us"]
    return rows


def run_case(case, rank, ops, backends, dims, dtype, device, smoke, rates):
    """Rows (dicts) for every op x backend of one case at one rank."""
    case_batch = CaseBatch(case, rank, dims, device, smoke)
    rows = []
    for op in ops:
        rows += run_op(OpInputs(op, case_batch, dtype), case, backends, device, rates)
        if device.type == "cuda":  # the op's inputs are gone: give their memory back
            torch.cuda.empty_cache()
    return rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", help=f"names or prefixes of {[c.name for c in CASES]}")
    parser.add_argument("--ops", nargs="+", help=f"names or prefixes of {OP_NAMES}")
    parser.add_argument("--backends", nargs="+", help="default: lora_ops.BACKENDS (torch_native only with --smoke)")
    parser.add_argument("--ranks", nargs="+", type=int, help="run every selected case at these ranks "
                        "(default: 16 and 64 for prefill/decode, 16 for the rest)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; cases not started by then are skipped and listed (default: no limit)")
    parser.add_argument("--host-overhead-only", action="store_true",
                        help="measure only the eager host overhead per call")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, float32, no CUDA graphs (Triton backends interpreted)")
    parser.add_argument("--out-dir", default="bench_results")
    return parser.parse_args()


def header_lines(args, device, dims, dtype, rates):
    smoke = " (smoke: tiny shapes, float32, perf_counter timing)" if args.smoke else ""
    lines = [
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}{smoke}",
        f"torch {torch.__version__}, triton {triton_version()}, dtype {str(dtype).replace('torch.', '')}",
        f"shapes: hidden {dims.in_features}, q {dims.q_size}, kv {dims.kv_size}, "
        f"intermediate {dims.intermediate}; {NUM_SLOTS} adapter slots",
    ]
    if rates is None:
        return lines
    return lines + [
        f"copy bandwidth: {rates[0] / 1e12:.3f} TB/s (device-to-device copy, read + write, median)",
        f"matmul rate: {rates[1] / 1e12:.1f} TFLOP/s ({'256^3 fp32' if args.smoke else '8192^3 bf16'}, median)",
        "roofline = max(bytes / copy bw, flops / matmul rate); copy roofline = bytes / copy bw; "
        "targets: decode <= 2x roofline + 3 us, prefill >= 75% of roofline",
        "timing: perf_counter, median of 5 eager calls" if args.smoke else
        f"timing: CUDA graphs of {CALLS_PER_GRAPH} back-to-back calls, replays between CUDA events, median "
        "per call; 'eager' = not capturable, timed as eager calls; no L2 flush between replays",
        "dense: one cuBLAS GEMM of the op's shape over all tokens, timed the same way (shrink x @ A[0].T; "
        "expand base += y @ W.T, W of shape (out, n*R)); x dense = op time / dense time",
        "check: every backend's result against a float64 reference (lora_ops.testing); the error bound is "
        "2x the error of torch doing the same math in the dtype + 4 ulps of the output",
    ]


def main():
    args = parse_args()
    t_start = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: full-size cases need a GPU; use --smoke for the CPU check")
    if args.smoke and not torch.cuda.is_available():
        # Before the first Triton kernel is imported (lazily, by the first call that runs one).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.smoke else "cuda")
    dims, dtype = (SMOKE_DIMS, torch.float32) if args.smoke else (LLAMA3_8B, torch.bfloat16)
    cases = [c for c in CASES if c.name in select([c.name for c in CASES], args.cases, "case")]
    ops = [o for o in OPS if o.name in select(OP_NAMES, args.ops, "op")]
    backends = args.backends or (["torch_native"] if args.smoke else list(lora_ops.BACKENDS))
    out_base = os.path.join(args.out_dir, device_short_name(device) + ("-smoke" if args.smoke else ""))

    host_calls = 10 if args.smoke else HOST_CALLS  # interpreted Triton calls are slow
    print(f"eager host overhead: 1 token, {host_calls} calls per row", flush=True)
    host_rows = measure_host_overhead(backends, dims, dtype, device, calls=host_calls)
    if args.host_overhead_only:
        header = header_lines(args, device, dims, dtype, rates=None)
        report([], host_rows, header, backends, out_base + "-host", host_csv=out_base + "-host.csv")
        return

    if args.smoke:
        rates = (roofline.measure_copy_bandwidth(device, 1 << 24, repeats=3),
                 roofline.measure_matmul_rate(device, 256, torch.float32, repeats=3))
    else:
        rates = (roofline.measure_copy_bandwidth(device), roofline.measure_matmul_rate(device))
    header = header_lines(args, device, dims, dtype, rates)
    for line in header:
        print(line, flush=True)

    rows, skipped = [], []
    for case in cases:
        for rank in (args.ranks or case.ranks):
            elapsed = time.perf_counter() - t_start
            if args.time_budget is not None and elapsed > args.time_budget:
                skipped.append(f"{case.name} r{rank}")
                continue
            print(f"[{elapsed:6.1f}s] {case.name} rank {rank}", flush=True)
            try:
                rows += run_case(case, rank, ops, backends, dims, dtype, device, args.smoke, rates)
            except Exception as e:  # building the batch failed: report and go on
                print(f"  {case.name} r{rank}: case failed: {first_line(e)}", flush=True)
                skipped.append(f"{case.name} r{rank} (failed: {first_line(e)})")
            write_csv(rows, out_base + ".csv", COLUMNS)  # after every case, so a run cut short keeps its rows
            copy_to_out([out_base + ".csv"])

    if skipped:
        header.append(f"skipped (time budget or failure): {', '.join(skipped)}")
    header.append(f"total time: {time.perf_counter() - t_start:.0f} s")
    paths = report(rows, host_rows, header, backends, out_base, host_csv=out_base + "-host.csv")
    print("wrote " + ", ".join(paths) + (f" (and copied to {os.environ['OUT']})" if os.environ.get("OUT") else ""),
          flush=True)


if __name__ == "__main__":
    main()
