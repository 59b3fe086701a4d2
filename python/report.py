"""The benchmark's report: the results table, the anchors' comparison, the eager host-overhead
table, as markdown, CSV and a roofline plot.

The CSV keeps the column names of every earlier version of the bench (compare_bench.py joins
old and new files on case, op and backend); later columns were only added.
"""

import csv
import os
import re
import shutil

import numpy as np
import torch

from bench_cases import OP_NAMES
from timing import first_line

COLUMNS = [  # (key, header, format)
    ("case", "case", "{}"), ("op", "op", "{}"), ("backend", "backend", "{}"), ("mode", "mode", "{}"),
    ("us", "time us", "{:.1f}"), ("gbps", "GB/s", "{:.0f}"), ("roofline_us", "roofline us", "{:.2f}"),
    ("copy_roofline_us", "copy roofline us", "{:.2f}"),
    ("pct_roofline", "% roofline", "{:.1f}"), ("pct_copy", "% copy roofline", "{:.1f}"),
    ("speedup", "x torch_native", "{:.2f}"), ("target", "target", "{}"), ("verdict", "verdict", "{}"),
    ("check", "check", "{}"), ("note", "note", "{}"),
    ("dense_us", "dense GEMM us", "{:.1f}"), ("x_dense", "x dense", "{:.2f}"),
]
HOST_COLUMNS = [
    ("case", "case", "{}"), ("op", "call", "{}"), ("backend", "backend", "{}"), ("mode", "mode", "{}"),
    ("us", "us per call", "{:.1f}"), ("x_matmul", "x one matmul", "{:.2f}"), ("note", "note", "{}"),
]


# ----------------------------------------------------------------------------- anchors

ANCHORS_SOURCE = ("the ANCHORS table measured on one H200 (torch 2.11, triton 3.6) in one process beside "
                  "this library: copy bandwidth 2.72 TB/s, CUDA-graph replay; "
                  "cells in op order qkv shrink / qkv expand / gate-up shrink / gate-up expand")
ANCHORS = {  # (case, rank) -> unit, {library: four cells in OP_NAMES order}
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
ANCHOR_COPY_BW = 2.72e12  # bytes/s: the copy bandwidth the anchors' percentages are relative to


def best_anchor(case, rank, op_name):
    """(value, library, unit) of the best anchor for this cell, or None."""
    if (case, rank) not in ANCHORS:
        return None
    unit, libraries = ANCHORS[(case, rank)]
    i = OP_NAMES.index(op_name)
    pick = max if unit.startswith("%") else min
    library = pick(libraries, key=lambda lib: libraries[lib][i])
    return libraries[library][i], library, unit


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
    for case, rank in ANCHORS:
        for op_name in OP_NAMES:
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


# ----------------------------------------------------------------------------- tables and files

def fmt(value, pattern):
    return "" if value is None or value == "" else pattern.format(value)


def markdown_table(headers, cell_rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |" for cells in cell_rows]
    return "\n".join(lines)


def column_table(rows, columns):
    """Markdown of dict rows, one column per (key, header, format)."""
    headers = [header for _, header, _ in columns]
    return markdown_table(headers, [[fmt(row.get(key), pattern) for key, _, pattern in columns] for row in rows])


def write_csv(rows, path, columns):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _, _ in columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def copy_to_out(paths):
    """Copies the files to $OUT when it is set (the device machine returns that folder)."""
    if os.environ.get("OUT"):
        for path in paths:
            shutil.copy(path, os.environ["OUT"])


def report(rows, host_rows, header_lines, backends, out_stem, host_csv):
    """Print the tables and write <out_stem>.md, .csv and .png (when there are op rows) and the
    host-overhead CSV (when there are host rows); copy them to $OUT if set."""
    parts = ["# lora_ops benchmark", ""] + [f"- {line}" for line in header_lines]
    if rows:
        anchors = markdown_table(["case", "op", "best anchor", *backends], anchor_rows(rows, backends))
        parts += [
            "", "## Results", "", column_table(rows, COLUMNS), "",
            "## Against the anchors", "", f"Source: {ANCHORS_SOURCE}. "
            "Prefill anchors are given as % of a 2.72 TB/s copy roofline and are converted to microseconds "
            "with our byte model; every cell compares times (lower is better). The anchors ran on an H200: "
            "compare with care on another card.",
            "", anchors]
    if host_rows:
        parts += ["", "## Eager host overhead", "",
                  "One token, back-to-back eager calls timed with a host clock (one synchronise at the end); "
                  "'x one matmul' is the time per call over that of one torch matmul in the same run.",
                  "", column_table(host_rows, HOST_COLUMNS)]
    text = "\n".join(parts) + "\n"
    print("\n" + text, flush=True)

    os.makedirs(os.path.dirname(out_stem) or ".", exist_ok=True)
    with open(out_stem + ".md", "w") as f:
        f.write(text)
    paths = [out_stem + ".md"]
    if rows:
        write_csv(rows, out_stem + ".csv", COLUMNS)
        paths.append(out_stem + ".csv")
        try:
            paths.append(plot_roofline(rows, backends, out_stem + ".png", title=header_lines[0]))
        except Exception as e:
            print(f"plot failed: {first_line(e)}", flush=True)
    if host_rows:
        write_csv(host_rows, host_csv, HOST_COLUMNS)
        paths.append(host_csv)
    copy_to_out(paths)
    return paths


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


def triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "not installed"
