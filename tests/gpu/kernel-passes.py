#!/usr/bin/env python3
"""Kernel times per forward pass from an Nsight Compute CSV of `gpu__time_duration.sum`
(tests/gpu/kernel-times, tests/gpu/prefill-kernels, tests/gpu/decode-kernels). A pass starts at its `embed` kernel.

Usage: kernel-passes.py NCU_CSV [PASS ...]   (pass indices, negative from the end; default 0 -1)
"""
import csv
import sys
from collections import defaultdict


def passes_of(path):
    rows = [r for r in csv.reader(open(path)) if len(r) > 5]
    header = rows[0]
    name_at, value_at = header.index("Kernel Name"), header.index("Metric Value")
    passes = []
    for r in rows[1:]:
        name = r[name_at].split("(")[0]
        if name == "embed" or not passes:
            passes.append([])
        passes[-1].append((name, float(r[value_at].replace(",", "")) / 1000.0))
    return passes


def main():
    passes = passes_of(sys.argv[1])
    chosen = [int(p) for p in sys.argv[2:]] or [0, -1]
    for index, kernels in enumerate(passes):
        total = sum(t for _, t in kernels)
        print(f"pass {index}: {len(kernels)} kernels, {total:.0f} us")
    for index in chosen:
        kernels = passes[index]
        by_name = defaultdict(lambda: [0, 0.0])
        for name, t in kernels:
            by_name[name][0] += 1
            by_name[name][1] += t
        print(f"\npass {index % len(passes)}\n| kernel | launches | us |\n| --- | ---: | ---: |")
        for name, (count, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
            print(f"| {name} | {count} | {t:.1f} |")
        longest = sorted(kernels, key=lambda k: -k[1])[:12]
        print("longest launches (us): " + ", ".join(f"{name} {t:.1f}" for name, t in longest))


if __name__ == "__main__":
    main()
