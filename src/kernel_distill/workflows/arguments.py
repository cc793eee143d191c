"""The command line's shared options, and the request parts built from them.

Each workflow module adds its own subcommand (``add_parser``) with these helpers and turns the parsed
options into its request (``request_from_args``). Standard library and numpy only: ``--help`` loads no JAX,
so the choices below are spelt out rather than imported (tests check they match the library's).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

import numpy as np

from kernel_distill.workflows.common import DEFAULT_ZCA_REG, Compute, KernelChoice, Preprocessing

EXIT_USAGE = 2
FLOAT32_MAX = float(np.finfo(np.float32).max)
EXPORT_FORMATS = ("safetensors", "imagefolder", "parquet")  # export.FORMATS
KERNEL_CHOICES = ("fc", "convnet", "convnet3", "convnet-rf", "convnet3-rf")
RF_NORM_CHOICES = ("none", "instance")  # kernels.spec.RF_NORMS


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kernel-distill: error: {message} (see {self.prog} --help)\n")


def number(minimum: float | None = None, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float (NaN and inf refused), optionally bounded below."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if abs(value) > FLOAT32_MAX:  # computations run in float32 unless --float64: it would become inf
            raise argparse.ArgumentTypeError(f"{text} is beyond the float32 range (+-{FLOAT32_MAX:.3g})")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


POSITIVE, NON_NEGATIVE = number(0.0, strict=True), number(0.0)


def add_common(p: argparse.ArgumentParser, kernel_options: bool = True) -> None:
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill)")
    if kernel_options:
        p.add_argument("--float64", action="store_true", help="compute kernels and solves in float64")
        p.add_argument("--memory-budget-mb", type=POSITIVE, default=None,
                       help="memory bound for one block of the kernel computation (default 512 on a CPU; on "
                            "a GPU an eighth of its memory, at most 16384)")
        add_backend(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="also print the result record (results.json) as one JSON line")


def add_overwrite(p: argparse.ArgumentParser, what: str = "outputs") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} of an earlier run of this command in --out (a non-empty --out is "
                        f"refused otherwise; another command's run never is replaced)")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where kernels are computed: this process (default) or Ray workers (docs/DISTRIBUTED.md)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to use: 'auto' or HOST:PORT (default: start one on this machine for the command)")
    p.add_argument("--worker-retries", type=int, default=3,
                   help="restarts of a failed Ray worker before the command stops (default 3)")


def add_kernel(p: argparse.ArgumentParser, default_kernel: str | None = "fc", fc_depth: int = 1) -> None:
    p.add_argument("--kernel", choices=KERNEL_CHOICES, default=default_kernel,
                   help="infinite network: fc, convnet (KIP ConvNet) or convnet3 (without the first conv); "
                        "-rf: its NNGP from random finite networks (RFAD; docs/KERNELS.md)")
    p.add_argument("--get", choices=("ntk", "nngp"), default=None,
                   help="which kernel (default ntk; nngp for the -rf kernels, which approximate only the NNGP)")
    p.add_argument("--depth", type=int, default=None, help=f"hidden layers (fc, default {fc_depth}) or conv blocks (3)")
    p.add_argument("--W-std", dest="W_std", type=POSITIVE, default=None, help="weight std (default sqrt(2))")
    p.add_argument("--b-std", dest="b_std", type=NON_NEGATIVE, default=None, help="bias std (default 0.1)")
    p.add_argument("--reg", type=NON_NEGATIVE, default=None, help="KRR regulariser relative to trace(K)/n (1e-6)")
    p.add_argument("--rf-models", type=int, default=None,
                   help="-rf kernels: random networks per kernel (default 8)")
    p.add_argument("--rf-width", type=int, default=None,
                   help="-rf kernels: channels of each random network (default 128)")
    p.add_argument("--rf-seed", type=int, default=None,
                   help="-rf kernels: seed of the fixed evaluation networks (default 0)")
    p.add_argument("--rf-norm", choices=RF_NORM_CHOICES, default=None,
                   help="-rf conv kernels: instance: normalise each random conv's output per image and channel, "
                        "as the evaluation ConvNet does (a different kernel from the exact NNGP; default none)")


def add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the images (KIP's zca_normalize)")
    p.add_argument("--zca-reg", type=POSITIVE, default=None,
                   help=f"ZCA regulariser relative to trace(C)/d (default {DEFAULT_ZCA_REG}; a file's own "
                        f"preprocessing is used as it is)")


# ----------------------------------------------------------------------------------------------------
# Parsed options -> request parts.


def kernel_choice(args: argparse.Namespace) -> KernelChoice:
    return KernelChoice(kernel=args.kernel, get=args.get, depth=args.depth, W_std=args.W_std, b_std=args.b_std,
                        reg=args.reg, rf_models=args.rf_models, rf_width=args.rf_width, rf_seed=args.rf_seed,
                        rf_norm=args.rf_norm)


def compute(args: argparse.Namespace) -> Compute:
    return Compute(float64=args.float64, memory_budget_mb=args.memory_budget_mb, backend=args.backend,
                   workers=args.workers, ray_address=args.ray_address, worker_retries=args.worker_retries)


def preprocessing(args: argparse.Namespace) -> Preprocessing:
    return Preprocessing(zca=args.zca, zca_reg=args.zca_reg)


def command_line(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The command line the CLI recorded (``main`` sets it) for results.json."""
    line = getattr(args, "command_line", None)
    return None if line is None else tuple(line)
