"""The random-feature ConvNet kernel against the exact one on a CIFAR-sized problem: error, time, KRR accuracy.

For a support set (a distilled file, in its own preprocessing) and ``--test-limit`` test images, computes
the exact NNGP blocks ``K_ss`` and ``K_ts`` (``n x 1,000``) once, then the random-feature kernel for each
``--configs`` ``MxW`` (M networks of width W, the fixed evaluation networks of seed 0): the relative
Frobenius error of ``K_ts`` and of ``K_ss``, the seconds each kernel took, and the KRR test accuracy of the
support with each kernel on those test images. The exact matrices are cached (``--cache``), so a rerun with
other configs does not pay the exact kernel again.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/random_features.py \\
        --support runs/cifar-rf-10/distilled_best.npz --dataset cifar10 --test-limit 1000
    .venv/bin/python benchmarks/tables.py

One record per kernel goes to benchmarks/results/random_features.jsonl, with the 1-minute load average
(the CPU may be shared; one JAX process uses about 1.1 of this machine's 2 cores).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "random_features.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--support", required=True, help="distilled-set .npz (its kernel's architecture is used)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--configs", default="1x32,4x64,4x128,8x128,16x128",
                        help="comma-separated MxW random-feature kernels")
    parser.add_argument("--data-dir", default=os.environ.get("KERNEL_DISTILL_DATA"))
    parser.add_argument("--cache", default=None, help="npz for the exact matrices (default: beside --support)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    import jax

    from kernel_distill import experiments
    from kernel_distill.io import load_distilled
    from kernel_distill.kernels import KernelSpec, RandomFeatures, make_kernel_fn
    from kernel_distill.krr import solve_support
    from kernel_distill.results import append_record, dataset_record, make_record, split_checksum

    distilled = load_distilled(args.support)
    preprocessor = experiments.preprocessing_for(distilled, args.support, args.dataset, args.data_dir,
                                                 progress=False)
    x_test_raw, y_test = experiments.load_test_split(args.dataset, args.data_dir, args.test_limit, progress=False)
    x_test = np.asarray(preprocessor.apply(x_test_raw), np.float32)
    x_s, y_s = np.asarray(distilled.images, np.float32), np.asarray(distilled.labels, np.float64)
    recorded = distilled.metadata.get("kernel", {})
    exact_spec = KernelSpec(recorded.get("architecture", "convnet"), depth=recorded.get("depth"))
    cache = pathlib.Path(args.cache or pathlib.Path(args.support).with_suffix(f".exact-nngp-{len(x_test)}.npz"))

    def accuracy(k_ss, k_ts):
        pred = np.asarray(k_ts, np.float64) @ solve_support(np.asarray(k_ss), y_s, distilled.metadata.get("reg", 1e-6))
        return float(np.mean(pred.argmax(1) == y_test))

    def timed(fn):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        return out, time.perf_counter() - start

    if cache.is_file():
        with np.load(cache) as f:
            k_ss, k_ts, exact_seconds = f["k_ss"], f["k_ts"], float(f["seconds"])
        print(f"exact {exact_spec.architecture} NNGP from {cache} ({exact_seconds:.0f} s when computed)")
    else:
        kernel_fn = make_kernel_fn(exact_spec)
        (k_ss, k_ts), exact_seconds = timed(lambda: (kernel_fn(x_s, get="nngp"), kernel_fn(x_test, x_s, get="nngp")))
        k_ss, k_ts = np.asarray(k_ss), np.asarray(k_ts)
        np.savez(cache, k_ss=k_ss, k_ts=k_ts, seconds=exact_seconds)
        print(f"exact {exact_spec.architecture} NNGP: {exact_seconds:.0f} s")
    pairs = len(x_s) * (len(x_s) + len(x_test))
    dataset = dataset_record(args.dataset, dict(test=split_checksum(x_test_raw, y_test)), num_test=len(y_test))
    base_config = dict(support=str(args.support), support_size=len(x_s), test_limit=args.test_limit,
                       architecture=exact_spec.architecture, depth=exact_spec.depth, get="nngp")

    def record(impl, metrics, seconds, **config):
        r = make_record("benchmark/random_features", impl, dataset,
                        dict(metrics, seconds=seconds, pairs=pairs, load_average=os.getloadavg()[0]),
                        dict(base_config, impl=impl, **config), wall_seconds=seconds)
        append_record(args.results, r)

    exact_accuracy = accuracy(k_ss, k_ts)
    record("exact", dict(krr_accuracy=exact_accuracy), exact_seconds)
    print(f"exact: KRR {100 * exact_accuracy:.2f}% on {len(y_test)} test images")
    for item in args.configs.split(","):
        models, width = (int(v) for v in item.lower().split("x"))
        spec = KernelSpec(exact_spec.architecture, depth=exact_spec.depth,
                          random_features=RandomFeatures(models, width))
        kernel_fn = make_kernel_fn(spec)
        kernel_fn(x_s[:2])  # compile outside the timing, as the exact kernel's cache of compiled tiles is warm too
        (rf_ss, rf_ts), seconds = timed(lambda: (kernel_fn(x_s), kernel_fn(x_test, x_s)))
        rf_ss, rf_ts = np.asarray(rf_ss, np.float64), np.asarray(rf_ts, np.float64)
        error_ts = float(np.linalg.norm(rf_ts - k_ts) / np.linalg.norm(k_ts))
        error_ss = float(np.linalg.norm(rf_ss - k_ss) / np.linalg.norm(k_ss))
        rf_accuracy = accuracy(rf_ss, rf_ts)
        record("rf", dict(relative_error_ts=error_ts, relative_error_ss=error_ss, krr_accuracy=rf_accuracy,
                          speedup_vs_exact=exact_seconds / seconds), seconds, models=models, width=width)
        print(f"{models}x{width}: error K_ts {error_ts:.4f}, K_ss {error_ss:.4f}, {seconds:.1f} s "
              f"({exact_seconds / seconds:.0f}x faster), KRR {100 * rf_accuracy:.2f}%")


if __name__ == "__main__":
    main()
