"""``kernel-distill export``: write a distilled set for PyTorch / Hugging Face users (docs/INTEROP.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import Log


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """Export ``set`` (a distilled-set ``.npz``, a run folder, or ``zoo:NAME``) to ``out`` in ``format``:
    ``safetensors`` (one ``.safetensors`` file), ``imagefolder`` or ``parquet`` (a folder)."""

    set: str
    out: str
    format: str
    overwrite: bool = False
    data_dir: str | None = None  # where zoo sets that are downloaded are kept
    progress: bool = True


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="write a distilled set for PyTorch / Hugging Face users (docs/INTEROP.md)")
    p.add_argument("set", metavar="SET", help="a distilled-set .npz, a run folder, or zoo:NAME")
    p.add_argument("out", metavar="OUT",
                   help="safetensors: a .safetensors file; imagefolder, parquet: a folder (new or empty)")
    p.add_argument("--format", choices=arguments.EXPORT_FORMATS, required=True,
                   help="safetensors (tensors + preprocessing, exact), imagefolder (PNGs per class in pixel space "
                        "+ labels.csv) or parquet (one row per image, loadable with Hugging Face datasets)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (never another command's files)")
    p.add_argument("--data-dir", default=None, help="where zoo sets that are downloaded are kept")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    return ExportRequest(set=args.set, out=args.out, format=args.format, overwrite=args.overwrite,
                         data_dir=args.data_dir, progress=not args.no_progress)


def run(request: ExportRequest, log: Log = print) -> dict:
    """Own ``out`` (a file, or a folder, by the run-folder rules), read the set, write it; returns the
    exporter's summary (``path``, and what was approximated)."""
    from kernel_distill import export
    from kernel_distill.runs import claim_output_file, claim_output_folder

    if request.format == "safetensors":
        if not str(request.out).endswith(".safetensors"):
            raise KernelDistillError(f"OUT {request.out}: a safetensors export is one file; give a path ending in "
                                     f".safetensors")
        claim: contextlib.AbstractContextManager[pathlib.Path] = claim_output_file(
            request.out, overwrite=request.overwrite, option="OUT")
    else:
        claim = claim_output_folder(request.out, "export", overwrite=request.overwrite, option="OUT")
    src = export.load_source(request.set, request.data_dir, progress=request.progress)
    with claim:
        summary = export.export(src, request.out, request.format)
    n, k = src.distilled.images.shape[0], src.distilled.num_classes
    log(f"{request.set}: {n} images, {k} classes -> {summary['path']} ({request.format}; source sha256 "
        f"{src.sha256[:12]}...)")
    if summary.get("why"):
        log(f"note: {summary['why']}")
    if summary.get("clipped_fraction"):
        log(f"note: {100 * summary['clipped_fraction']:.2f}% of the pixel values lay outside [0, 1] and were "
            f"clipped in the PNGs (the safetensors and parquet exports keep them exactly)")
    return summary
