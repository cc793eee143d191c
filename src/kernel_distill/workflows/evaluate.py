"""``kernel-distill evaluate``: the KRR test accuracy of a distilled set."""

from __future__ import annotations

import argparse
import dataclasses
import time

from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (Compute, KernelChoice, Log, OnRecord, Preprocessing, argv, check_positive,
                                             default_get, distilled_path, kernel_function, kernel_spec,
                                             output_folder, refuse_preprocessing_options, regulariser, write_record)


@dataclasses.dataclass(frozen=True)
class EvaluateRequest:
    """Score ``file`` (a distilled-set ``.npz``, a released KIP file, or ``zoo:NAME``) by KRR on a test split.

    The kernel, ``get`` and ``reg`` default to those recorded in the file; ``dataset`` to the file's own (a
    different one is refused). ``out``: a folder for ``results.json`` (none: nothing is written)."""

    file: str
    dataset: str | None = None
    test_limit: int | None = None
    out: str | None = None
    overwrite: bool = False
    kernel: KernelChoice = dataclasses.field(default_factory=KernelChoice)
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    compute: Compute = dataclasses.field(default_factory=Compute)
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="KRR test accuracy of a distilled set (.npz)")
    p.add_argument("file", help="distilled set: a kernel-distill .npz, a released KIP .npz, or zoo:NAME")
    p.add_argument("--dataset", default=None,
                   help="dataset whose test split is used (default: the file's; a different one is refused)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--out", default=None, help="folder for results.json (new or empty)")
    arguments.add_overwrite(p)
    arguments.add_kernel(p, default_kernel=None)
    arguments.add_preprocess(p)
    arguments.add_common(p)


def request_from_args(args: argparse.Namespace) -> EvaluateRequest:
    return EvaluateRequest(file=args.file, dataset=args.dataset, test_limit=args.test_limit, out=args.out,
                           overwrite=args.overwrite, kernel=arguments.kernel_choice(args),
                           preprocessing=arguments.preprocessing(args), compute=arguments.compute(args),
                           data_dir=args.data_dir, progress=not args.no_progress,
                           command_line=arguments.command_line(args))


def run(request: EvaluateRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request and the file, own ``out``, score the set; returns the result record (written to
    ``out/results.json`` when there is an ``out``)."""
    from kernel_distill.io import dataset_of, load_distilled

    check_positive("--test-limit", request.test_limit)
    request.compute.backend_options()
    request.compute.enable_precision()
    distilled = load_distilled(distilled_path(request.file, request.data_dir, request.progress), request.data_dir,
                               request.progress)
    dataset = dataset_of(distilled, request.file, request.dataset)
    refuse_preprocessing_options(request.preprocessing, distilled, request.file)
    with output_folder(request.out, "evaluate", request.overwrite):
        record = _evaluate(request, distilled, dataset, log)
        return write_record(request.out, record, on_record)


def _evaluate(request: EvaluateRequest, distilled, dataset: str, log: Log) -> dict:
    from kernel_distill import experiments
    from kernel_distill.checksums import split_checksum
    from kernel_distill.data import limit_test
    from kernel_distill.results import dataset_record, make_record

    start = time.perf_counter()
    preprocessor = experiments.preprocessing_for(distilled, request.file, dataset, request.data_dir,
                                                 request.preprocessing.zca, request.preprocessing.reg,
                                                 progress=request.progress, log=log)
    x_test, y_test = experiments.load_test_split(dataset, request.data_dir, None, request.progress)
    checksum = split_checksum(x_test, y_test)  # of the whole split, as every record's checksums are
    if request.test_limit:
        x_test, y_test = limit_test(x_test, y_test, request.test_limit)
    meta = distilled.metadata
    spec = kernel_spec(request.kernel, meta.get("kernel"))
    # An explicit --kernel starts from that kernel's defaults, not from the file's get.
    get = request.kernel.get or (meta.get("get", "ntk") if request.kernel.kernel is None
                                 else default_get(request.kernel, spec))
    reg = regulariser(request.kernel, meta)
    dtype = request.compute.dtype
    with request.compute.open_backend() as backend:
        result = experiments.evaluate_distilled(distilled, preprocessor, x_test, y_test,
                                                kernel_function(request.compute, spec), reg, get, dtype,
                                                progress=request.progress, backend=backend)
    metrics = result["metrics"]
    log(f"{request.file}: {len(distilled.images)} support images, {spec.description} {get.upper()} "
        f"(depth {spec.depth}), reg {reg:g}: test accuracy {100 * metrics['test_accuracy']:.2f}% on "
        f"{metrics['num_test']} {dataset} test images ({result['seconds']:.1f} s)")
    config = dict(file=str(request.file), kernel=spec.to_dict(), get=get, reg=reg, test_limit=request.test_limit,
                  file_metadata=meta)
    return make_record("evaluate", "file", dataset_record(dataset, dict(test=checksum), num_test=metrics["num_test"]),
                       metrics, config, dtype=dtype.__name__, wall_seconds=time.perf_counter() - start,
                       argv=argv(request.command_line))
