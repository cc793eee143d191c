"""``kernel-distill zoo``: list, show, export and report the distilled-set zoo; and measure a set's KRR
accuracy the way the index records it (:func:`evaluate_file`, used by ``tools/zoo_add.py`` and the tests).

The zoo itself (:mod:`kernel_distill.zoo`) is an index: it names, verifies and describes sets, and
measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import Log


@dataclasses.dataclass(frozen=True)
class ZooListRequest:
    json: bool = False  # the index entries as one JSON line instead of a table


@dataclasses.dataclass(frozen=True)
class ZooShowRequest:
    name: str
    json: bool = False  # one JSON line instead of indented JSON


@dataclasses.dataclass(frozen=True)
class ZooExportRequest:
    """Copy set ``name`` (checksum verified) to ``path``: a ``.npz`` file, or a folder (then ``NAME.npz``)."""

    name: str
    path: str
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class ZooReportRequest:
    out: str
    overwrite: bool = False


ZooRequest = ZooListRequest | ZooShowRequest | ZooExportRequest | ZooReportRequest


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("zoo", help="ready-made distilled sets shipped with kernel-distill (use them as zoo:NAME)")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND",
                           parser_class=arguments.OneLineErrorParser)
    q = zoo.add_parser("list", help="the zoo's sets with their measured accuracies")
    q.add_argument("--json", action="store_true", help="print the index entries as JSON")
    q = zoo.add_parser("show", help="everything the index records of one set (command, wall time, machine, ...)")
    q.add_argument("name", help="a zoo set name (from zoo list)")
    q.add_argument("--json", action="store_true", help="print the index entry as JSON")
    q = zoo.add_parser("export", help="copy a zoo set (checksum verified) to a file or folder")
    q.add_argument("name", help="a zoo set name (from zoo list)")
    q.add_argument("path", help="destination .npz file, or a folder (then NAME.npz in it)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing file (never a run's file, nor one in a folder a live run holds)")
    q = zoo.add_parser("report", help="an HTML page of the zoo: its table and every set's image grid (offline)")
    q.add_argument("--out", required=True, help="report folder, new or empty (index.html, img/)")
    arguments.add_overwrite(q, "report")


def request_from_args(args: argparse.Namespace) -> ZooRequest:
    if args.zoo_command == "list":
        return ZooListRequest(args.json)
    if args.zoo_command == "show":
        return ZooShowRequest(args.name, args.json)
    if args.zoo_command == "report":
        return ZooReportRequest(args.out, args.overwrite)
    return ZooExportRequest(args.name, args.path, args.overwrite)


def run(request: ZooRequest, log: Log = print) -> list[dict] | dict | pathlib.Path:
    """Carry out one zoo subcommand: returns the entries (list, show), the written file (export) or the
    report's ``index.html``."""
    from kernel_distill import zoo

    if isinstance(request, ZooListRequest):
        return _list(request, log)
    if isinstance(request, ZooShowRequest):
        e = zoo.entry(request.name)
        log(json.dumps(e) if request.json else json.dumps(e, indent=2))
        return e
    if isinstance(request, ZooReportRequest):
        from kernel_distill.report import build_zoo_report
        from kernel_distill.runs import claim_output_folder

        with claim_output_folder(request.out, "report", overwrite=request.overwrite):
            index = build_zoo_report(request.out)
            log(f"zoo report: {index.resolve()}")
        return index
    destination = export_set(request.name, request.path, overwrite=request.overwrite)
    log(f"zoo:{request.name} -> {destination} (sha256 {zoo.entry(request.name)['sha256']})")
    return destination


def _list(request: ZooListRequest, log: Log) -> list[dict]:
    from kernel_distill import zoo

    entries = zoo.read_index()
    if request.json:
        log(json.dumps(entries))
        return entries
    if not entries:
        log("the zoo is empty")
        return entries
    rows = [[c.strip("`") for c in row] for row in zoo.table_rows(entries)]
    header = zoo.TABLE_HEADER
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        log("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    model = entries[0].get("transfer", {}).get("model", "evalnet") if entries[0].get("transfer") else "evalnet"
    log("KRR %: the set's own kernel on the whole test set; transfer %: "
        f"{model} trained on the set, mean +- std over seeds (kernel-distill zoo show NAME for the protocol)")
    log("use a set as zoo:NAME, e.g. kernel-distill evaluate zoo:" + entries[0]["name"])
    return entries


def export_set(name: str, destination: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Copy zoo set ``name`` (verified) to ``destination``: a file path, or a folder (then ``NAME.npz`` in it).

    An existing file is replaced only with ``overwrite``, and never a run's file or one in a folder a live run
    holds (:func:`kernel_distill.runs.claim_output_file`).
    """
    from kernel_distill import zoo
    from kernel_distill.atomic import atomic_write_bytes
    from kernel_distill.runs import check_output_path, claim_output_file

    destination = check_output_path(destination, "PATH")
    if destination.is_dir():
        destination = destination / f"{name}.npz"
    if destination.suffix != ".npz":
        raise KernelDistillError(f"{destination}: a distilled set is an .npz file; give a path ending in .npz or "
                                 f"a folder")
    source = zoo.path(name)
    with claim_output_file(destination, overwrite=overwrite) as target:
        return atomic_write_bytes(target, source.read_bytes())


def evaluate_file(file: str | os.PathLike, data_dir: str | os.PathLike | None = None, progress: bool = False,
                  memory_budget_mb: float = 512.0, test_limit: int | None = None) -> dict:
    """KRR test accuracy of a distilled-set file with the kernel, ``get`` and ``reg`` recorded in it, on its
    dataset's whole test split, in float32: the number an index entry's ``krr.test_accuracy`` holds.
    ``test_limit``: only the test images :func:`kernel_distill.data.limit_test` keeps (``krr.subset``).

    The kernel is rebuilt from the file's metadata through :meth:`KernelSpec.from_dict` and
    :func:`make_kernel_fn`, so any architecture the package knows is measured the same way. Returns
    ``dict(test_accuracy, num_test, seconds, dataset, kernel, get, reg)``.
    """
    import numpy as np

    from kernel_distill import experiments
    from kernel_distill.io import dataset_of, load_distilled
    from kernel_distill.kernels import KernelSpec, make_kernel_fn
    from kernel_distill.krr import DEFAULT_REG

    distilled = load_distilled(file, data_dir, progress)
    meta = distilled.metadata
    if "kernel" not in meta or distilled.preprocessor is None:
        raise KernelDistillError(f"{file}: a zoo set must record its kernel and carry its preprocessing "
                                 f"(a kernel-distill file, not a released KIP file)")
    spec = KernelSpec.from_dict(meta["kernel"])
    get, reg = meta.get("get", "ntk"), meta.get("reg", DEFAULT_REG)
    dataset = dataset_of(distilled, str(file), None)
    x_test, y_test = experiments.load_test_split(dataset, data_dir, test_limit, progress)
    kernel_fn = make_kernel_fn(spec, memory_budget_bytes=int(memory_budget_mb * 2**20))
    result = experiments.evaluate_distilled(distilled, distilled.preprocessor, x_test, y_test, kernel_fn, reg, get,
                                            np.float32, progress=progress)
    return dict(test_accuracy=result["metrics"]["test_accuracy"], num_test=result["metrics"]["num_test"],
                seconds=result["seconds"], dataset=dataset, kernel=spec.to_dict(), get=get, reg=reg)
