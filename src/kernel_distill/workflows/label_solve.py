"""``kernel-distill label-solve``: the optimal labels of a support over a training set (Label Solve)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (Compute, KernelChoice, Log, OnRecord, Preprocessing, argv, check_positive,
                                             default_get, distilled_path, kernel_function, kernel_spec,
                                             output_folder, refuse_preprocessing_options, regulariser, write_record)


@dataclasses.dataclass(frozen=True)
class LabelSolveRequest:
    """Solve the labels of a support over ``dataset``'s training set and score them on its test set.

    The support is ``support`` (a distilled-set file's images, or ``zoo:NAME``) or a seeded class-balanced
    natural sample of ``support_size`` images. ``out`` (default ``runs/ls-DATASET-SIZE``) receives
    ``distilled.npz``, ``label_covariance.png`` and ``results.json``."""

    dataset: str
    support_size: int = 100
    support: str | None = None
    seed: int | None = None  # None: 0 for a natural support; must stay None with ``support``
    train_limit: int | None = None
    test_limit: int | None = None
    block_size: int = 5000
    ls_reg: float = 1e-6
    out: str | None = None
    overwrite: bool = False
    kernel: KernelChoice = dataclasses.field(default_factory=lambda: KernelChoice(kernel="fc"))
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    compute: Compute = dataclasses.field(default_factory=Compute)
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("label-solve", help="solve the optimal labels of a natural support over the training set")
    p.add_argument("--dataset", required=True, help="dataset whose training set the labels are solved over")
    p.add_argument("--support-size", type=int, default=100,
                   help="class-balanced natural support size (a multiple of the number of classes; default 100)")
    p.add_argument("--support", default=None,
                   help="use the images of this distilled-set .npz (or zoo:NAME) as the support")
    p.add_argument("--seed", type=int, default=None, help="seed of the natural support sample (default 0)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--block-size", type=int, default=5000, help="training images per kernel block (5000)")
    p.add_argument("--ls-reg", type=arguments.NON_NEGATIVE, default=1e-6,
                   help="ridge on K_st K_ts, relative to its trace / n (default 1e-6)")
    p.add_argument("--out", default=None, help="output folder, new or empty (default runs/ls-DATASET-SIZE)")
    arguments.add_overwrite(p)
    arguments.add_kernel(p)
    arguments.add_preprocess(p)
    arguments.add_common(p)


def request_from_args(args: argparse.Namespace) -> LabelSolveRequest:
    return LabelSolveRequest(dataset=args.dataset, support_size=args.support_size, support=args.support,
                             seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit,
                             block_size=args.block_size, ls_reg=args.ls_reg, out=args.out, overwrite=args.overwrite,
                             kernel=arguments.kernel_choice(args), preprocessing=arguments.preprocessing(args),
                             compute=arguments.compute(args), data_dir=args.data_dir, progress=not args.no_progress,
                             command_line=arguments.command_line(args))


def run(request: LabelSolveRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request (and the support file), own the output folder, solve; returns the result record."""
    from kernel_distill.io import check_preprocessing_request, dataset_of, load_distilled

    for name, value in (("--train-limit", request.train_limit), ("--test-limit", request.test_limit)):
        check_positive(name, value)
    check_positive("--block-size", request.block_size, allow_none=False)
    request.compute.backend_options()
    request.compute.enable_precision()
    given = None
    if request.support:
        given = load_distilled(distilled_path(request.support, request.data_dir, request.progress))
        dataset_of(given, request.support, request.dataset)
        check_preprocessing_request(given, request.support, request.preprocessing.zca)
        refuse_preprocessing_options(request.preprocessing, given, request.support)
        if request.seed is not None:
            raise KernelDistillError(f"--seed draws a natural support; with --support the images are "
                                     f"{request.support}'s: drop --seed")
        size = len(given.images)
    else:
        check_positive("--support-size", request.support_size, allow_none=False)
        size = request.support_size
    if request.seed is None:
        request = dataclasses.replace(request, seed=0)
    if request.train_limit is not None and request.train_limit < size:
        raise KernelDistillError(f"--train-limit {request.train_limit} gives fewer training targets than the {size} "
                                 f"support images: their labels would be underdetermined; use --train-limit {size} "
                                 f"or more")
    out = request.out if request.out is not None else f"runs/ls-{request.dataset}-{size}"
    with output_folder(out, "label-solve", request.overwrite) as folder:  # checked and locked before the solve
        record = write_record(folder, _label_solve(request, given, folder, log), on_record)
    log(f"outputs in {folder}: distilled.npz, label_covariance.png, results.json")
    return record


def _label_solve(request: LabelSolveRequest, given, out: pathlib.Path, log: Log) -> dict:
    from kernel_distill import experiments, plots
    from kernel_distill.data import prepare_dataset
    from kernel_distill.io import DistilledSet, save_distilled
    from kernel_distill.preprocess import centered_one_hot
    from kernel_distill.results import dataset_record, make_record

    start = time.perf_counter()
    pre, dtype = request.preprocessing, request.compute.dtype
    # A support file's own preprocessing maps the training and test images into its space.
    data = prepare_dataset(request.dataset, request.data_dir, zca=pre.zca, zca_reg=pre.reg,
                           test_limit=request.test_limit, progress=request.progress,
                           preprocessor=given.preprocessor if given is not None else None)
    spec = kernel_spec(request.kernel)
    get, reg = default_get(request.kernel, spec), regulariser(request.kernel)
    kernel_fn = kernel_function(request.compute, spec)
    if given is not None:
        if given.images.shape[1:] != data.x_train.shape[1:] or given.num_classes != data.num_classes:
            raise KernelDistillError(f"{request.support} does not match {request.dataset}: images "
                                     f"{given.images.shape[1:]}, {given.num_classes} label columns")
        x_support = given.images.astype(dtype)
        original = centered_one_hot(given.labels.argmax(axis=1), data.num_classes)
    else:
        assert request.seed is not None  # run() draws a natural support with seed 0 unless given one
        x_support, original = experiments.natural_support(data, request.support_size, request.seed, dtype)
    with request.compute.open_backend() as backend:
        result = experiments.label_solve_on(data, kernel_fn, x_support, original, reg, request.ls_reg, get,
                                            request.train_limit, request.block_size, dtype, request.progress,
                                            backend=backend)
    metrics = result["metrics"]
    config = dict(support=request.support, support_size=len(x_support), seed=request.seed, kernel=spec.to_dict(),
                  get=get, reg=reg, ls_reg=request.ls_reg, zca=pre.zca, zca_reg=pre.reg,
                  train_limit=request.train_limit, test_limit=request.test_limit, block_size=request.block_size)
    meta = dict(dataset=request.dataset, method="label_solve", seed=request.seed, kernel=spec.to_dict(), get=get,
                reg=reg, ls_reg=request.ls_reg, metrics=metrics)
    save_distilled(out / "distilled.npz", DistilledSet(x_support, result["labels"], data.preprocessor, meta))
    plots.save_figure(out / "label_covariance.png", plots.heatmap_figure(
        result["covariance"], "original class (one-hot)", "solved label column", data.class_names,
        title=f"Label Solve, {request.dataset}, support {len(x_support)}"))
    log(f"Label Solve on {request.dataset}: support {len(x_support)}, {metrics['num_train']} training images, "
        f"{spec.description} {get.upper()}, {metrics['solve_seconds']:.1f} s, peak memory "
        f"{metrics['peak_rss_mb']:.0f} MB")
    log(f"KRR test accuracy: original labels {100 * metrics['test_accuracy_original_labels']:.2f}%, solved labels "
        f"{100 * metrics['test_accuracy']:.2f}% ({metrics['num_test']} test images)")
    record = make_record("label-solve", "label_solve",
                         dataset_record(request.dataset, data.checksums, num_train=metrics["num_train"],
                                        num_test=metrics["num_test"]),
                         metrics, config, curves=dict(label_covariance=result["covariance"]),
                         artifacts=dict(distilled="distilled.npz", label_covariance="label_covariance.png"),
                         dtype=dtype.__name__, wall_seconds=time.perf_counter() - start,
                         argv=argv(request.command_line))
    return record
