"""Label Solve: KRR test accuracy with natural vs solved labels, wall time and peak memory.

Each configuration runs ``kernel-distill label-solve`` in its own process (so peak memory is its own) over
the full training set, and the table is printed in Markdown. Each run's ``results.json`` is appended to
``--results`` (default ``benchmarks/results/label_solve.jsonl``), from which ``benchmarks/tables.py`` makes
the table of docs/BENCHMARKS.md.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/label_solve.py \
        --datasets mnist fashion_mnist cifar10 --sizes 10 100 500
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import time

from kernel_distill.results import append_record, read_results

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "label_solve.jsonl"
PUBLISHED_LS_CONVNET = {("mnist", 10): 73.4, ("mnist", 100): 96.4, ("mnist", 500): 98.3,
                        ("fashion_mnist", 10): 65.3, ("fashion_mnist", 100): 80.8, ("fashion_mnist", 500): 86.9,
                        ("cifar10", 10): 26.3, ("cifar10", 100): 46.3, ("cifar10", 500): 57.4}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist", "cifar10"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 100, 500])
    parser.add_argument("--kernel", default="fc")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more label-solve arguments")
    parser.add_argument("--out", default="runs/bench-ls")
    parser.add_argument("--results", default=str(RESULTS), help="append each run's result record here")
    args = parser.parse_args()
    print(f"# Label Solve, {args.kernel} NTK, {time.strftime('%Y-%m-%d')}")
    print("| dataset | support | train images | natural labels % | solved labels % | published LS (ConvNet) % "
          "| solve s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        for size in args.sizes:
            out = pathlib.Path(args.out) / f"{name}-{args.kernel}-{size}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run folder each time
            cmd = [sys.executable, "-m", "kernel_distill.cli", "label-solve", "--dataset", name, "--support-size",
                   str(size), "--kernel", args.kernel, "--out", str(out), "--no-progress", *args.extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {name} | {size} | failed: {proc.stderr.strip().splitlines()[-1][:100]} | | | | | |")
                continue
            record = read_results(out)
            append_record(args.results, record)
            m = record["metrics"]
            print(f"| {name} | {size} | {m['num_train']} | {100 * m['test_accuracy_original_labels']:.2f} | "
                  f"{100 * m['test_accuracy']:.2f} | {PUBLISHED_LS_CONVNET.get((name, size), '-')} | "
                  f"{m['solve_seconds']:.1f} | {m['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
