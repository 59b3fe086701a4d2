"""Compare two benchmark CSVs: old and new time per (case, op, backend), flagging slowdowns.

Usage:   python python/compare_bench.py OLD.csv NEW.csv [--threshold 3]

Reads any CSV of bench.py, old or new (it needs the columns case, op, backend, us), including
the host-overhead CSV (<device>-host.csv). Prints one row per key found in either file: old us,
new us, new/old, and SLOWER where the new time exceeds the old by more than the threshold
(percent). Always exits 0: it reports, it does not gate.
"""

import argparse
import csv

KEY = ("case", "op", "backend")


def read_times(path):
    """{(case, op, backend): microseconds or None (the op did not run)}, in file order."""
    with open(path, newline="") as f:
        return {tuple(row[k] for k in KEY): float(row["us"]) if row.get("us") else None
                for row in csv.DictReader(f)}


def compare(old, new, threshold_pct):
    """Rows of (case, op, backend, old us, new us, ratio, flag) and the count of slower rows."""
    rows, slower = [], 0
    for key in list(old) + [k for k in new if k not in old]:
        old_us, new_us = old.get(key), new.get(key)
        ratio, flag = None, ""
        if old_us and new_us:
            ratio = new_us / old_us
            if ratio > 1 + threshold_pct / 100:
                flag, slower = "SLOWER", slower + 1
        elif key not in new:
            flag = "only in old"
        elif key not in old:
            flag = "only in new"
        elif old_us != new_us:  # one of the two did not run
            flag = "n/a in new" if new_us is None else "n/a in old"
        rows.append((*key, old_us, new_us, ratio, flag))
    return rows, slower


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--threshold", type=float, default=3.0, help="percent slower to flag (default 3)")
    args = parser.parse_args()

    rows, slower = compare(read_times(args.old), read_times(args.new), args.threshold)

    def cell(value, pattern):
        return "" if value is None else pattern.format(value)

    print("| case | op | backend | old us | new us | new/old | |")
    print("|---|---|---|---|---|---|---|")
    for case, op, backend, old_us, new_us, ratio, flag in rows:
        print(f"| {case} | {op} | {backend} | {cell(old_us, '{:.2f}')} | {cell(new_us, '{:.2f}')} "
              f"| {cell(ratio, '{:.3f}')} | {flag} |")
    print(f"\n{slower} of {len(rows)} rows slower by more than {args.threshold:g} %")


if __name__ == "__main__":
    main()
