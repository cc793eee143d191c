"""``kernel-distill demo``: KIP on scikit-learn's digits (bundled, no files), then its report.

A composition: a fixed KIP run (through :func:`kernel_distill.kip.run_kip`, which owns the run folder) and
the report workflow on it (``OUT/report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from kernel_distill.workflows.common import Log, argv


@dataclasses.dataclass(frozen=True)
class DemoRequest:
    out: str = "runs/demo"
    overwrite: bool = False
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="the built-in example on scikit-learn's digits (no files needed)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def request_from_args(args: argparse.Namespace) -> DemoRequest:
    from kernel_distill.workflows.arguments import command_line

    return DemoRequest(out=args.out, overwrite=args.overwrite, progress=not args.no_progress,
                       command_line=command_line(args))


def run(request: DemoRequest, log: Log = print) -> pathlib.Path:
    """Distil digits to 10 learned images and labels per class, then report the run; returns the report's
    ``index.html``."""
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.kip import KipConfig, prepare_for, run_kip
    from kernel_distill.runs import check_output_path
    from kernel_distill.workflows.report import ReportRequest, write_report

    out = check_output_path(request.out)
    config = KipConfig(dataset="digits", per_class=10, kernel=KernelSpec("fc"), learn_labels=True, steps=1000,
                       eval_every=100, checkpoint_every=100)
    data = prepare_for(config, progress=False)
    start = time.perf_counter()
    summary = run_kip(config, data, out, progress=request.progress, overwrite=request.overwrite,
                      command_line=argv(request.command_line))
    log(f"KIP on digits ({len(data.y_train):,} training images -> 10 per class, {data.num_val} held out for "
        f"validation), FC NTK, {summary['step']} steps in {time.perf_counter() - start:.0f} s: KRR test accuracy "
        f"{100 * summary['last_accuracy']:.2f}% (final), {100 * summary['best_test_accuracy']:.2f}% "
        f"(validation-best, step {summary['best_step']}) on {len(data.y_test)} test images")
    log(f"outputs in {out}/: distilled.npz, distilled_best.npz, grid.png, curve.png, metrics.jsonl, results.json")
    log("MNIST: KERNEL_DISTILL_DATA=DIR .venv/bin/kernel-distill kip --dataset mnist --per-class 10 "
        "--learn-labels --steps 2000 --out runs/mnist-fc-10")
    index = write_report(ReportRequest(runs=(str(out),), out=str(out / "report"), overwrite=request.overwrite))
    log(f"report (open in a browser): {index.resolve()}")
    return index
