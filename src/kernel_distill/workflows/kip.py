"""``kernel-distill kip``: distill a dataset with KIP, or resume a run.

The algorithm lives in :mod:`kernel_distill.kip` (its ``run_kip`` writes the run's files and its record);
this workflow builds its :class:`~kernel_distill.kip.KipConfig` from the request, owns the run folder
(:func:`kernel_distill.runs.claim_run_folder`) and compares a resumed run's request with the saved one
before any data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import TYPE_CHECKING

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (Compute, KernelChoice, Log, OnRecord, argv, check_positive,
                                             distilled_path, kernel_spec)

if TYPE_CHECKING:
    from kernel_distill.kip import KipConfig


# kip.config.KIP_FC_DEPTH, for --help (tests/test_kip.py checks they agree; importing kip here would load
# JAX for --help)
HELP_KIP_FC_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class KipRequest:
    """A KIP run. Every ``None`` means "the default" for a new run (:class:`~kernel_distill.kip.KipConfig`)
    and "as saved" for a resumed one (``resume``: the run folder to continue; only ``steps`` and the
    intervals may change then).

    ``out``: the run folder (default ``runs/kip-DATASET-PERCLASS``). ``init_from``: start from this distilled
    set's images and labels (a file or ``zoo:NAME``) instead of ``init``."""

    dataset: str | None = None
    per_class: int | None = None
    learn_labels: bool | None = None
    rf_fixed_networks: bool | None = None
    init: str | None = None
    init_from: str | None = None
    target_batch: int | None = None
    lr: float | None = None
    loss: str | None = None
    seed: int | None = None
    steps: int | None = None
    eval_every: int | None = None
    select_on: str | None = None
    val_size: int | None = None
    checkpoint_every: int | None = None
    test_limit: int | None = None
    zca: bool | None = None
    zca_reg: float | None = None
    kernel: KernelChoice = dataclasses.field(default_factory=KernelChoice)
    compute: Compute = dataclasses.field(default_factory=Compute)
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kip", help="distill a dataset with KIP (learn support images, optionally labels)")
    p.add_argument("--dataset", default=None, help="dataset to distill (default digits)")
    p.add_argument("--per-class", type=int, default=None, help="support images per class (default 10)")
    p.add_argument("--learn-labels", action="store_true", default=None, help="also learn the support labels")
    p.add_argument("--rf-fixed-networks", action="store_true", default=None,
                   help="-rf kernels: keep the evaluation networks every step (default: fresh random networks "
                        "each step, drawn from the run's key)")
    p.add_argument("--init", choices=("real", "noise"), default=None,
                   help="support initialisation: random real training images (default) or Gaussian noise")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from this distilled set's images and labels (.npz or zoo:NAME) and go on distilling "
                        "it; same dataset, images per class and preprocessing as this run")
    p.add_argument("--target-batch", type=int, default=None,
                   help="class-balanced target images per step (default 10000 with the fc kernel, 5000 with the "
                        "others; capped by the smallest class)")
    p.add_argument("--lr", type=arguments.POSITIVE, default=None, help="Adam learning rate (default 0.01)")
    p.add_argument("--loss", choices=("mse", "platt"), default=None,
                   help="KIP objective: mse (KIP's squared error, default) or platt (RFAD's cross-entropy of the KRR "
                        "predictions times a learned scale)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial support and the target batches (default 0)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 1000; with --resume: new total)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluation interval, validation and test (default 100)")
    p.add_argument("--select-on", choices=("validation", "test"), default=None,
                   help="split that picks distilled_best.npz: validation (default) or test (only to reproduce the "
                        "papers; written in the file's metadata and the report)")
    p.add_argument("--val-size", type=int, default=None,
                   help="class-balanced validation images held out of the training split, never used as targets "
                        "(default 200 on digits, 5000 otherwise; 0 with --select-on test)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval (default 100)")
    p.add_argument("--out", default=None,
                   help="output folder, empty or new (default runs/kip-DATASET-PERCLASS)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (otherwise a non-empty --out is refused)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR; only --steps and the intervals may change")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    arguments.add_kernel(p, default_kernel=None, fc_depth=HELP_KIP_FC_DEPTH)
    p.add_argument("--zca", action="store_true", default=None, help="ZCA-whiten the images")
    p.add_argument("--zca-reg", type=arguments.POSITIVE, default=None, help="ZCA regulariser (default 0.1)")
    arguments.add_common(p)
    p.set_defaults(memory_budget_mb=None)  # a resumed run keeps its own unless the option is given


def request_from_args(args: argparse.Namespace) -> KipRequest:
    return KipRequest(
        dataset=args.dataset, per_class=args.per_class, learn_labels=args.learn_labels,
        rf_fixed_networks=args.rf_fixed_networks, init=args.init, init_from=args.init_from,
        target_batch=args.target_batch, lr=args.lr, loss=args.loss, seed=args.seed, steps=args.steps,
        eval_every=args.eval_every, select_on=args.select_on, val_size=args.val_size,
        checkpoint_every=args.checkpoint_every, test_limit=args.test_limit, zca=args.zca, zca_reg=args.zca_reg,
        kernel=arguments.kernel_choice(args), compute=arguments.compute(args), out=args.out,
        overwrite=args.overwrite, resume=args.resume, data_dir=args.data_dir, progress=not args.no_progress,
        command_line=arguments.command_line(args))


def kip_config(request: KipRequest, base: KipConfig | None = None) -> KipConfig:
    """The :class:`~kernel_distill.kip.KipConfig` of ``request``: its options over ``base`` (a resumed run's
    saved config), else over the defaults."""
    from kernel_distill.kip import KipConfig

    compute = request.compute
    # a new run gets the device's default; a resumed one keeps its own unless the option is given
    budget = None if base is not None and compute.memory_budget_mb is None else compute.budget_mb()
    values = base.to_dict() if base is not None else dict(KipConfig().to_dict(), default_target_batch=None)
    overrides = dict(dataset=request.dataset, per_class=request.per_class, learn_labels=request.learn_labels,
                     init=request.init, target_batch_size=request.target_batch, learning_rate=request.lr,
                     reg=request.kernel.reg, zca=request.zca, zca_reg=request.zca_reg, seed=request.seed,
                     steps=request.steps, eval_every=request.eval_every, checkpoint_every=request.checkpoint_every,
                     get=request.kernel.get, test_limit=request.test_limit, memory_budget_mb=budget,
                     select_on=request.select_on, val_size=request.val_size,
                     float64=True if compute.float64 else None,
                     rf_fixed_networks=True if request.rf_fixed_networks else None, loss=request.loss)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if request.init_from is not None:
        from kernel_distill.checksums import file_sha256

        if request.init is not None:
            raise KernelDistillError("--init and --init-from are alternatives: give one")
        init_file = str(pathlib.Path(distilled_path(request.init_from, request.data_dir, request.progress)).resolve())
        if not pathlib.Path(init_file).is_file():
            raise KernelDistillError(f"--init-from: {request.init_from}: no such file")
        values.update(init="file", init_file=init_file, init_sha256=file_sha256(init_file))
    if request.kernel.names_an_architecture():
        spec = kernel_spec(request.kernel, values["kernel"])
        values["kernel"] = spec.to_dict()
        if request.kernel.get is None and spec.random_features is not None:
            values["get"] = "nngp"
    return KipConfig.from_dict(values)


RUN_OUTPUTS = "distilled.npz, distilled_best.npz, grid.png, curve.png, metrics.jsonl, config.json, results.json"


def run(request: KipRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request, own (or reopen, to resume) the run folder, run KIP; returns the run's record
    (``results.json``, written by the run itself)."""
    from kernel_distill.kip import RUN_FILES, check_resume, load_checkpoint, prepare_for, run_kip
    from kernel_distill.results import read_results
    from kernel_distill.runs import claim_run_folder

    check_positive("--test-limit", request.test_limit)
    request.compute.backend_options()
    request.compute.enable_precision()
    resuming = request.resume is not None
    if request.resume is not None:
        if request.out is not None:
            raise KernelDistillError(f"--out cannot be used with --resume: the run continues in {request.resume}")
        if request.overwrite:
            raise KernelDistillError("--overwrite cannot be used with --resume")
        out: str = request.resume
        claim = claim_run_folder(out, resume=True)
    else:
        config = kip_config(request)
        out = request.out if request.out is not None else f"runs/kip-{config.dataset}-{config.per_class}"
        claim = claim_run_folder(out, overwrite=request.overwrite, run_files=RUN_FILES, command="kip")
    # The folder is checked, locked and (on resume) the request compared before any data is loaded.
    with claim:
        if resuming:
            saved, _ = load_checkpoint(pathlib.Path(out))
            config = kip_config(request, saved)
            check_resume(pathlib.Path(out), config)
        if request.compute.backend != "local" and config.kernel.random_features is not None:
            raise KernelDistillError(f"KIP with the {config.kernel.name} kernel runs on the local backend only; "
                                     f"drop --backend {request.compute.backend}")
        data = prepare_for(config, request.data_dir, progress=request.progress)
        start = time.perf_counter()
        with request.compute.open_backend() as backend:
            summary = run_kip(config, data, out, resume=resuming, overwrite=request.overwrite,
                              progress=request.progress, command_line=argv(request.command_line), backend=backend)
    summary["seconds"] = time.perf_counter() - start
    chosen = "validation" if config.select_on == "validation" else "TEST (as the KIP papers did)"
    log(f"KIP {config.dataset}, {config.per_class}/class, {config.kernel.description} {config.get.upper()}, "
        f"{summary['step']} steps in {summary['seconds']:.0f} s: test accuracy {100 * summary['last_accuracy']:.2f}% "
        f"(final), {100 * summary['best_test_accuracy']:.2f}% (best on {chosen}, step {summary['best_step']})")
    log(f"outputs in {out}: {RUN_OUTPUTS}")
    record = read_results(out)
    if on_record is not None:
        on_record(record)
    return record
