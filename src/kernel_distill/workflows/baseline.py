"""``kernel-distill baseline``: the KRR accuracy of random natural class-balanced subsets."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (Compute, KernelChoice, Log, OnRecord, Preprocessing, argv, check_positive,
                                             default_get, kernel_function, kernel_spec, output_folder, regulariser,
                                             write_record)


@dataclasses.dataclass(frozen=True)
class BaselineRequest:
    """Score ``seeds`` random subsets of ``per_class`` natural images per class (seeds ``0..seeds-1``).

    ``out``: a folder for ``results.json`` and ``natural.npz`` (the seed-0 subset); none: nothing is written."""

    dataset: str
    per_class: int = 10
    seeds: int = 5
    test_limit: int | None = None
    out: str | None = None
    overwrite: bool = False
    kernel: KernelChoice = dataclasses.field(default_factory=lambda: KernelChoice(kernel="fc"))
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    compute: Compute = dataclasses.field(default_factory=Compute)
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("baseline", help="KRR accuracy of random natural class-balanced subsets")
    p.add_argument("--dataset", required=True, help="dataset to sample from and test on (see: datasets)")
    p.add_argument("--per-class", type=int, default=10, help="images per class in each subset (default 10)")
    p.add_argument("--seeds", type=int, default=5, help="number of random subsets (seeds 0..N-1)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--out", default=None,
                   help="folder for results.json and natural.npz (the seed-0 subset), new or empty")
    arguments.add_overwrite(p)
    arguments.add_kernel(p)
    arguments.add_preprocess(p)
    arguments.add_common(p)


def request_from_args(args: argparse.Namespace) -> BaselineRequest:
    return BaselineRequest(dataset=args.dataset, per_class=args.per_class, seeds=args.seeds,
                           test_limit=args.test_limit, out=args.out, overwrite=args.overwrite,
                           kernel=arguments.kernel_choice(args), preprocessing=arguments.preprocessing(args),
                           compute=arguments.compute(args), data_dir=args.data_dir, progress=not args.no_progress,
                           command_line=arguments.command_line(args))


def run(request: BaselineRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request, own ``out``, score the subsets; returns the result record."""
    from kernel_distill.data import dataset_info

    check_positive("--per-class", request.per_class, allow_none=False)
    check_positive("--seeds", request.seeds, allow_none=False)
    check_positive("--test-limit", request.test_limit)
    request.compute.backend_options()
    request.compute.enable_precision()
    dataset_info(request.dataset)  # an unknown dataset is refused before the folder is made
    with output_folder(request.out, "baseline", request.overwrite):
        return write_record(request.out, _baseline(request, log), on_record)


def _baseline(request: BaselineRequest, log: Log) -> dict:
    import numpy as np

    from kernel_distill import experiments
    from kernel_distill.io import save_distilled
    from kernel_distill.results import dataset_record, make_record

    spec = kernel_spec(request.kernel)
    get, reg = default_get(request.kernel, spec), regulariser(request.kernel)
    pre, dtype = request.preprocessing, request.compute.dtype
    start = time.perf_counter()
    with request.compute.open_backend() as backend:
        result = experiments.natural_baseline(request.dataset, request.per_class, request.seeds,
                                              kernel_function(request.compute, spec), reg, get, request.data_dir,
                                              pre.zca, pre.reg, request.test_limit, dtype,
                                              progress=request.progress, log=log, backend=backend)
    metrics = result["metrics"]
    acc = 100 * np.asarray(metrics["test_accuracies"])
    log(f"{request.dataset}, {request.per_class} per class, {spec.description} {get.upper()} depth {spec.depth}: "
        f"{acc.mean():.2f} +- {100 * metrics['test_accuracy_std']:.2f}% over {len(acc)} seeds "
        f"({metrics['num_test']} test images)")
    config = dict(per_class=request.per_class, seeds=request.seeds, kernel=spec.to_dict(), get=get, reg=reg,
                  zca=pre.zca, zca_reg=pre.reg, test_limit=request.test_limit)
    artifacts = {}
    if request.out:
        out = pathlib.Path(request.out)
        meta = dict(dataset=request.dataset, method="natural", per_class=request.per_class, seed=0,
                    kernel=spec.to_dict(), get=get, reg=reg, metrics=dict(test_accuracy=metrics["test_accuracies"][0]))
        first = result["first_subset"]
        save_distilled(out / "natural.npz", type(first)(first.images, first.labels, first.preprocessor, meta))
        artifacts["distilled"] = "natural.npz"
        log(f"outputs in {out}: natural.npz (the seed-0 subset), results.json")
    return make_record("baseline", "natural", dataset_record(request.dataset, result["checksums"],
                                                             num_test=metrics["num_test"]),
                       metrics, config, artifacts=artifacts, dtype=dtype.__name__,
                       wall_seconds=time.perf_counter() - start, argv=argv(request.command_line))
