"""``kernel-distill report``: a static HTML report of run folders (and optionally the zoo)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import Log


@dataclasses.dataclass(frozen=True)
class ReportRequest:
    """Report ``runs`` (run folders holding ``results.json``, or folders of them) into ``out`` (new or empty,
    or an earlier report with ``overwrite``). ``zoo``: add the distilled-set zoo's table and grids."""

    runs: tuple[str, ...]
    out: str
    overwrite: bool = False
    zoo: bool = False


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="a static HTML report of run folders (works offline, no server)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders holding results.json, or folders of them")
    p.add_argument("--out", required=True, help="report folder, new or empty (index.html, runs/, img/)")
    arguments.add_overwrite(p, "report")
    p.add_argument("--zoo", action="store_true", help="add the distilled-set zoo's table and image grids")


def request_from_args(args: argparse.Namespace) -> ReportRequest:
    return ReportRequest(runs=tuple(args.runs), out=args.out, overwrite=args.overwrite, zoo=args.zoo)


def write_report(request: ReportRequest) -> pathlib.Path:
    """Own ``out`` and build the report there (whole or not at all: :func:`kernel_distill.report.build_report`);
    returns its ``index.html``."""
    from kernel_distill.report import build_report
    from kernel_distill.runs import claim_output_folder

    with claim_output_folder(request.out, "report", overwrite=request.overwrite):
        return build_report(list(request.runs), request.out, zoo=request.zoo)


def run(request: ReportRequest, log: Log = print) -> pathlib.Path:
    from kernel_distill.report import find_runs

    index = write_report(request)
    log(f"report of {len(find_runs(request.runs))} run(s){' and the zoo' if request.zoo else ''}: {index.resolve()}")
    return index
