"""Hardware counters of the ops' kernels and of the dense GEMM of the same shape (Nsight Compute).

Run from the repository root:   PYTHONPATH=. python python/profile_ops.py [--cases ...] [--ranks ...]

What bounds a kernel that misses its target, from counters rather than guesses: the script
counts the kernels each call launches (torch.profiler), then runs itself under `ncu` (with
`--clock-control none`: the clocks the benchmark sees), where every call is made once after its
warm-up between cudaProfilerStart/Stop, so that only those launches are profiled. It prints one
line per kernel: time, grid, registers, local-memory spills, waves per SM, achieved occupancy,
SM / DRAM / L2 throughput in % of peak, L2 hit rate, the tensor pipe's activity, DRAM bytes, and
the three largest warp stall reasons (cycles per issued instruction). Each op's line is followed
by its dense GEMM's (bench_cases).
"""

import argparse
import csv
import os
import re
import subprocess
import sys

import torch

from bench_cases import CASES, LLAMA3_8B, OP_NAMES, OPS, CaseBatch, OpInputs, select

SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis",
            "ComputeWorkloadAnalysis"]
# (ncu raw metric, column); columns this ncu does not report are left out
COLUMNS = [
    ("gpu__time_duration.sum", "us"),
    ("launch__grid_size", "grid"),
    ("launch__registers_per_thread", "regs"),
    ("derived__local_spilling_requests", "spills"),
    ("launch__waves_per_multiprocessor", "waves"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM %"),
    ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "DRAM %"),
    ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 %"),
    ("lts__t_sector_hit_rate.pct", "L2 hit %"),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", "tensor %"),
]
DRAM_RATE = "dram__bytes.sum.per_second"  # times the duration: the "DRAM MB" column
# times in us (ncu writes "ns" or "nsecond" by version); %, counts as they are
TO_COLUMN_UNIT = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
TO_BYTES_PER_US = {"byte/s": 1e-6, "Kbyte/s": 1e-3, "Mbyte/s": 1.0, "Gbyte/s": 1e3, "Tbyte/s": 1e6}
STALL = re.compile(r"smsp__average_warp(?:s|_latency)_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def selected_calls(args, device):
    """[(label, zero-argument call)] in launch order: each op, then its dense GEMM."""
    case_names = select([c.name for c in CASES], args.cases, "case")
    op_names = select(OP_NAMES, args.ops, "op")
    calls = []
    for case in (c for c in CASES if c.name in case_names):
        for rank in args.ranks:
            case_batch = CaseBatch(case, rank, LLAMA3_8B, device, False)
            for op in (o for o in OPS if o.name in op_names):
                inputs = OpInputs(op, case_batch, torch.bfloat16)
                for backend in args.backends:
                    calls.append((f"{case.name} r{rank} {op.name} {backend}", inputs.call(backend)))
                calls.append((f"{case.name} r{rank} {op.name} dense", inputs.dense_call()))
    return calls


def warm(fn):
    fn()
    fn()  # compiles, then runs once more as it will be profiled
    torch.cuda.synchronize()


def kernel_counts(calls):
    """Kernels each call launches (memsets and copies are not kernels: ncu does not see them)."""
    counts = []
    for _, fn in calls:
        warm(fn)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        counts.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                          and not e.name.startswith(("Memset", "Memcpy"))))
    return counts


def run_profiled(calls):
    """Under ncu --profile-from-start off: each call once, alone between start and stop."""
    cudart = torch.cuda.cudart()
    for _, fn in calls:
        warm(fn)
        cudart.cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()


def kernel_rows(csv_path):
    """(header, units, rows) of ncu's raw CSV page: one row per profiled kernel."""
    with open(csv_path) as f:
        lines = list(csv.reader(f))
    start = next(i for i, line in enumerate(lines) if "Kernel Name" in line)
    header, units = lines[start], lines[start + 1]
    return header, units, [line for line in lines[start + 2:] if len(line) == len(header)]


def summarize(csv_path, labels, counts):
    header, units, rows = kernel_rows(csv_path)
    index = {name: i for i, name in enumerate(header)}
    stalls = [(m.group(1), i) for i, name in enumerate(header) if (m := STALL.match(name))]
    owners = [label for label, count in zip(labels, counts) for _ in range(count)]
    if len(owners) != len(rows):
        print(f"warning: {len(rows)} profiled kernels, {len(owners)} expected; labels may be misaligned")
    columns = [(index[metric], name, TO_COLUMN_UNIT.get(units[index[metric]], 1.0))
               for metric, name in COLUMNS if metric in index]
    time_column = index["gpu__time_duration.sum"]
    time_scale = TO_COLUMN_UNIT[units[time_column]]
    dram_rate = index.get(DRAM_RATE)
    names = [name for _, name, _ in columns] + (["DRAM MB"] if dram_rate is not None else [])
    print("| call | kernel | " + " | ".join(names) + " | top stalls (cycles/issue) |")
    print("|---" * (len(names) + 3) + "|")
    for n, row in enumerate(rows):
        def value(i):
            try:
                return float(row[i].replace(",", ""))
            except ValueError:
                return float("nan")
        cells = [f"{value(i) * scale:.4g}" for i, _, scale in columns]
        if dram_rate is not None:  # bytes per us x us / 1e6
            mb = value(dram_rate) * TO_BYTES_PER_US[units[dram_rate]] * value(time_column) * time_scale / 1e6
            cells.append(f"{mb:.4g}")
        reported = [(v, reason) for v, reason in ((value(i), reason) for reason, i in stalls) if v == v]  # not NaN
        top = sorted(reported, reverse=True)[:3]
        label = owners[n] if n < len(owners) else "?"
        print(f"| {label} | {row[index['Kernel Name']][:48]} | " + " | ".join(cells) + " | "
              + ", ".join(f"{reason} {v:.2g}" for v, reason in top) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["prefill_4x2048", "uniform_2048", "decode_1", "decode_32"],
                        help=f"names or prefixes of {[c.name for c in CASES]}")
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 128])
    parser.add_argument("--ops", nargs="+", default=OP_NAMES, help=f"names or prefixes of {OP_NAMES}")
    parser.add_argument("--backends", nargs="+", default=["triton"])
    parser.add_argument("--csv", default="ncu_ops.csv", help="where ncu's raw CSV goes")
    parser.add_argument("--profiled-run", action="store_true", help=argparse.SUPPRESS)  # the run under ncu
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_ops.py needs a CUDA device and Nsight Compute (ncu)")
    calls = selected_calls(args, torch.device("cuda"))
    if args.profiled_run:
        run_profiled(calls)
        return
    counts = kernel_counts(calls)
    command = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--page", "raw", "--csv",
               "--log-file", args.csv, *[f"--section={s}" for s in SECTIONS],
               sys.executable, os.path.abspath(__file__), "--profiled-run", *sys.argv[1:]]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summarize(args.csv, [label for label, _ in calls], counts)


if __name__ == "__main__":
    main()
