"""KRR test accuracy of random natural class-balanced subsets (the baseline every distilled set must beat).

For each dataset, FC NTK depth, and support size (images per class), draws ``--seeds`` seeded subsets of
the training set, evaluates KRR on the whole test set, and prints a Markdown table of mean +- std. Also
evaluates one random subset of ``--large`` training images (not class-balanced, seed 0). Every cell is
appended as a result record (docs/FORMAT.md) to ``--results`` (default ``benchmarks/results/krr_accuracy.jsonl``),
from which ``benchmarks/tables.py`` makes the table of docs/BENCHMARKS.md.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/krr_accuracy.py \
        --datasets mnist fashion_mnist --depths 1 3 --per-class 1 10 50 --seeds 5 --large 10000
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import numpy as np

from kernel_distill.data import class_balanced_indices, dataset_info, load_dataset
from kernel_distill.kernels import make_kernel_fn
from kernel_distill.krr import evaluate
from kernel_distill.preprocess import centered_one_hot, fit_preprocessor
from kernel_distill.results import append_record, dataset_record, make_record, split_checksum

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "krr_accuracy.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--per-class", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--large", type=int, default=10000, help="size of one random subset (0: skip)")
    parser.add_argument("--reg", type=float, default=1e-6)
    parser.add_argument("--results", default=str(RESULTS), help="append one result record per cell here")
    args = parser.parse_args()

    print(f"# KRR accuracy of random natural subsets, FC NTK; {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.default_backend()}")
    print("| dataset | depth | support | accuracy % (mean +- std) | seeds | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        info = dataset_info(name)
        x_train, y_train = load_dataset(name, "train")
        x_test, y_test = load_dataset(name, "test")
        checksums = dict(train=split_checksum(x_train, y_train), test=split_checksum(x_test, y_test))
        pre = fit_preprocessor(x_train)
        z_test = pre.apply(x_test)
        for depth in args.depths:
            kernel_fn = make_kernel_fn(architecture="fc", depth=depth)
            sizes = [(pc, "per_class") for pc in args.per_class] + ([(args.large, "random")] if args.large else [])
            for size, kind in sizes:
                start = time.perf_counter()
                seeds = range(args.seeds) if kind == "per_class" else range(1)
                accuracies = []
                for seed in seeds:
                    key = jax.random.PRNGKey(seed)
                    if kind == "per_class":
                        idx = class_balanced_indices(y_train, size, info.num_classes, key)
                    else:
                        idx = np.asarray(jax.random.permutation(key, len(y_train)))[:size]
                    result = evaluate(kernel_fn, pre.apply(x_train[idx]), centered_one_hot(y_train[idx], info.num_classes),
                                      z_test, y_test, reg=args.reg, progress=False)
                    accuracies.append(100 * result.accuracy)
                seconds = time.perf_counter() - start
                acc = np.asarray(accuracies)
                std = acc.std(ddof=1) if len(acc) > 1 else 0.0
                label = f"{size}/class" if kind == "per_class" else f"{size} random"
                print(f"| {name} | {depth} | {label} | {acc.mean():.2f} +- {std:.2f} | {len(acc)} | {seconds:.1f} |",
                      flush=True)
                support_size = size * info.num_classes if kind == "per_class" else size
                append_record(args.results, make_record(
                    "benchmark/krr_accuracy", "natural", dataset_record(name, checksums, num_test=len(y_test)),
                    dict(test_accuracy=float(acc.mean()) / 100, test_accuracy_std=float(std) / 100,
                         test_accuracies=(acc / 100).tolist(), support_size=support_size, num_test=len(y_test)),
                    dict(kernel=dict(architecture="fc", depth=depth), get="ntk", reg=args.reg, support=kind,
                         per_class=size if kind == "per_class" else None, seeds=len(acc)),
                    wall_seconds=seconds))


if __name__ == "__main__":
    main()
