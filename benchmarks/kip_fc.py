"""KIP with the FC NTK: KRR test accuracy after distillation, against the natural-subset baseline.

For each dataset, images per class, and labels learned or fixed, runs KIP (Adam lr 0.01, class-balanced
target batch of 5,000, FC NTK depth 1, reg 1e-6) and reports the KRR accuracy of the final support on the
whole test set, that of the support selected on the validation split, steps and wall time. Each run's
``results.json`` is appended to ``--results`` (default ``benchmarks/results/kip_fc.jsonl``), from which
``benchmarks/tables.py`` makes the table of docs/BENCHMARKS.md.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/kip_fc.py \
        --datasets mnist fashion_mnist --per-class 1 10 50 --steps 3000 6000 4000 --out runs/bench-kip
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax

from kernel_distill.kernels import KernelSpec
from kernel_distill.kip import DEFAULT_TARGET_BATCH, KipConfig, prepare_for, run_kip
from kernel_distill.results import append_record, read_results

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "kip_fc.jsonl"
PUBLISHED_KIP_FC = {("mnist", 1): 85.5, ("mnist", 10): 97.2, ("mnist", 50): 98.4}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--steps", nargs="+", type=int, default=[3000, 6000, 4000],
                        help="steps for each --per-class value, in order")
    parser.add_argument("--labels", nargs="+", default=["learned", "fixed"], choices=["learned", "fixed"])
    parser.add_argument("--kernel", default="fc", choices=["fc", "convnet", "convnet3"])
    parser.add_argument("--target-batch", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--select-on", default="validation", choices=["validation", "test"],
                        help="split that picks the selected support: validation (default; held out of the "
                             "training split) or test (only to reproduce the papers' protocol, and the rows "
                             "of commit c979632; all training images are then targets)")
    parser.add_argument("--out", default="runs/bench-kip")
    parser.add_argument("--results", default=str(RESULTS), help="append each run's result record here")
    args = parser.parse_args()
    if len(args.steps) != len(args.per_class):
        parser.error("give one --steps value per --per-class value")

    print(f"# KIP {args.kernel.upper()} NTK; {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"| dataset | per class | labels | steps | final acc % | {args.select_on}-selected acc % (step) "
          "| published KIP-FC % | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        # One validation split per dataset, the same for every run (it depends on the dataset only).
        data = prepare_for(KipConfig(dataset=name, select_on=args.select_on), progress=False)
        for per_class, steps in zip(args.per_class, args.steps):
            for labels in args.labels:
                # the settings of these rows, not kip's defaults (which changed after them: docs/KIP.md)
                config = KipConfig(dataset=name, per_class=per_class, kernel=KernelSpec(args.kernel),
                                   learning_rate=0.01, default_target_batch=DEFAULT_TARGET_BATCH,
                                   learn_labels=labels == "learned", steps=steps, eval_every=args.eval_every,
                                   select_on=args.select_on,
                                   checkpoint_every=max(steps // 4, 1), target_batch_size=args.target_batch)
                out = pathlib.Path(args.out) / f"{name}-{args.kernel}-{per_class}-{labels}"
                start = time.perf_counter()
                summary = run_kip(config, data, out, progress=False, log=lambda *_: None, overwrite=True)
                seconds = time.perf_counter() - start
                published = PUBLISHED_KIP_FC.get((name, per_class)) if args.kernel == "fc" else None
                print(f"| {name} | {per_class} | {labels} | {steps} | {100 * summary['last_accuracy']:.2f} | "
                      f"{100 * summary['best_test_accuracy']:.2f} ({summary['best_step']}) | "
                      f"{published if published and labels == 'learned' else '-'} | {seconds:.0f} |", flush=True)
                append_record(args.results, read_results(out))


if __name__ == "__main__":
    main()
