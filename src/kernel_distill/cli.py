"""The ``kernel-distill`` command line.

Every user-facing failure (bad argument, missing or malformed file, impossible request) prints one line,
``kernel-distill: error: ...``, and exits with code 2; Ctrl-C exits with 130, SIGTERM with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import signal
import sys
import threading
import time

import numpy as np

from kernel_distill.errors import KernelDistillError

EXIT_USAGE = 2


def _number(minimum: float | None = None, strict: bool = False):
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


FLOAT32_MAX = float(np.finfo(np.float32).max)
POSITIVE, NON_NEGATIVE = _number(0.0, strict=True), _number(0.0)


def _add_common(p: argparse.ArgumentParser, kernel_options: bool = True):
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill)")
    if kernel_options:
        p.add_argument("--float64", action="store_true", help="compute kernels and solves in float64")
        p.add_argument("--memory-budget-mb", type=POSITIVE, default=None,
                       help="memory bound for one block of the kernel computation (default 512 on a CPU; on "
                            "a GPU an eighth of its memory, at most 16384)")
        _add_backend(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="also print the result record (results.json) as one JSON line")


def _add_overwrite(p: argparse.ArgumentParser, what: str = "outputs"):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} of an earlier run of this command in --out (a non-empty --out is "
                        f"refused otherwise; another command's run never is replaced)")


def _add_backend(p: argparse.ArgumentParser):
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where kernels are computed: this process (default) or Ray workers (docs/DISTRIBUTED.md)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to use: 'auto' or HOST:PORT (default: start one on this machine for the command)")
    p.add_argument("--worker-retries", type=int, default=3,
                   help="restarts of a failed Ray worker before the command stops (default 3)")


def _backend_options(args):
    """The backend the options ask for, checked before any data is loaded."""
    from kernel_distill.distributed import BackendOptions

    return BackendOptions(args.backend, args.workers, args.ray_address, args.worker_retries)


def _open_backend(args):
    """A context giving the backend: ``None`` for local (the library's in-process path, unchanged)."""
    from kernel_distill.distributed import open_backend

    options = _backend_options(args)
    return contextlib.nullcontext() if options.backend == "local" else open_backend(options)


EXPORT_FORMATS = ("safetensors", "imagefolder", "parquet")  # export.FORMATS, spelt out so --help does not load it
KERNEL_CHOICES = ("fc", "convnet", "convnet3", "convnet-rf", "convnet3-rf")
RF_NORM_CHOICES = ("none", "instance")  # kernels.spec.RF_NORMS, spelt out so --help does not import JAX


def _add_kernel(p: argparse.ArgumentParser, default_kernel: str | None = "fc"):
    p.add_argument("--kernel", choices=KERNEL_CHOICES, default=default_kernel,
                   help="infinite network: fc, convnet (KIP ConvNet) or convnet3 (without the first conv); "
                        "-rf: its NNGP from random finite networks (RFAD; docs/KERNELS.md)")
    p.add_argument("--get", choices=("ntk", "nngp"), default=None,
                   help="which kernel (default ntk; nngp for the -rf kernels, which approximate only the NNGP)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (fc, default 1) or conv blocks (3)")
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


def _add_preprocess(p: argparse.ArgumentParser):
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the images (KIP's zca_normalize)")
    p.add_argument("--zca-reg", type=POSITIVE, default=None,
                   help=f"ZCA regulariser relative to trace(C)/d (default {DEFAULT_ZCA_REG}; a file's own "
                        f"preprocessing is used as it is)")


DEFAULT_ZCA_REG = 0.1


def _refuse_preprocessing_options(args, distilled, source: str) -> None:
    """A file that carries its preprocessing is used in its own space: an explicit --zca-reg would be
    silently ignored, so it is refused (``--zca`` is checked by :func:`io.check_preprocessing_request`)."""
    if getattr(args, "zca_reg_given", False) and distilled.preprocessor is not None:
        raise KernelDistillError(f"--zca-reg: {source} carries its own preprocessing, which is used as it is; "
                                 f"drop --zca-reg")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"kernel-distill: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from kernel_distill import __version__

    parser = _OneLineErrorParser(
        prog="kernel-distill",
        description="Dataset distillation with infinite-width neural kernels (KIP, Label Solve).")
    parser.add_argument("--version", action="version", version=f"kernel-distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_OneLineErrorParser)

    p = sub.add_parser("datasets", help="list the datasets and where they are found")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill)")

    p = sub.add_parser("evaluate", help="KRR test accuracy of a distilled set (.npz)")
    p.add_argument("file", help="distilled set: a kernel-distill .npz, a released KIP .npz, or zoo:NAME")
    p.add_argument("--dataset", default=None,
                   help="dataset whose test split is used (default: the file's; a different one is refused)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--out", default=None, help="folder for results.json (new or empty)")
    _add_overwrite(p)
    _add_kernel(p, default_kernel=None)
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("baseline", help="KRR accuracy of random natural class-balanced subsets")
    p.add_argument("--dataset", required=True, help="dataset to sample from and test on (see: datasets)")
    p.add_argument("--per-class", type=int, default=10, help="images per class in each subset (default 10)")
    p.add_argument("--seeds", type=int, default=5, help="number of random subsets (seeds 0..N-1)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--out", default=None,
                   help="folder for results.json and natural.npz (the seed-0 subset), new or empty")
    _add_overwrite(p)
    _add_kernel(p)
    _add_preprocess(p)
    _add_common(p)

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
                   help="class-balanced target images per step (default 5000, capped by the smallest class)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="Adam learning rate (default 0.01)")
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
    _add_kernel(p, default_kernel=None)
    p.add_argument("--zca", action="store_true", default=None, help="ZCA-whiten the images")
    p.add_argument("--zca-reg", type=POSITIVE, default=None, help="ZCA regulariser (default 0.1)")
    _add_common(p)
    p.set_defaults(memory_budget_mb=None)  # a resumed run keeps its own unless the option is given

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
    p.add_argument("--ls-reg", type=NON_NEGATIVE, default=1e-6,
                   help="ridge on K_st K_ts, relative to its trace / n (default 1e-6)")
    p.add_argument("--out", default=None, help="output folder, new or empty (default runs/ls-DATASET-SIZE)")
    _add_overwrite(p)
    _add_kernel(p)
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("transfer", help="train finite networks on a distilled set; report real test accuracy")
    p.add_argument("file", nargs="?", default=None,
                   help="distilled set (.npz or zoo:NAME); omit with --natural-per-class")
    p.add_argument("--dataset", default=None, help="test data (default: the file's metadata)")
    p.add_argument("--natural-per-class", type=int, default=None,
                   help="instead of a file, a random natural class-balanced subset of this size (baseline)")
    p.add_argument("--model", choices=("convnet", "convnet3", "fc", "evalnet"), default="convnet",
                   help="finite network: the KIP ConvNet (default), it without the first conv (convnet3), a fully "
                        "connected net (fc), or the field's evaluation ConvNet (evalnet: width 128, instance norm)")
    p.add_argument("--width", type=int, default=None, help="channels / units (convnet 128, fc 1024)")
    p.add_argument("--depth", type=int, default=None, help="conv blocks (3) or hidden layers (1)")
    p.add_argument("--parameterization", choices=("standard", "ntk"), default="standard",
                   help="weight parameterization of the finite network (default standard)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per seed (default 1000)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="sgd (momentum 0.9, cosine schedule; default) or adam")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="learning rate (default 0.05; 0.01 for convnet and convnet3, which have no normalisation)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=5e-4,
                   help="L2 weight decay, added to the gradient before the optimiser (coupled; default 5e-4)")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="mse on the (learned) labels or cross-entropy on their argmax")
    p.add_argument("--label-scale", type=POSITIVE, default=1.0,
                   help="mse: fit label-scale x the labels (RFAD's finite-network protocol; default 1)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per step (default 256; the whole set when it is smaller)")
    p.add_argument("--augment", choices=("none", "crop", "flip-crop", "dsa"), default="none",
                   help="random translations of up to 4 pixels (crop), and left-right flips (flip-crop, for "
                        "natural images) of each batch; or DSA's evaluation augmentation (dsa: per batch one "
                        "of colour, crop, cutout, flip, scale, rotation)")
    p.add_argument("--eval-every", type=int, default=100, help="test-accuracy interval in steps (default 100)")
    p.add_argument("--val-size", type=int, default=None,
                   help="class-balanced training images held out as a validation split (the one kip holds "
                        "out), scored beside the test set; default 0, or 5000 with --tune")
    p.add_argument("--tune", action="append", default=None, metavar="NAME=V1,V2,...",
                   help="choose the protocol on the validation split before the test set is read: one run per "
                        "combination; NAME is lr, steps, optimizer, loss, augment, weight_decay, batch_size or "
                        "label_scale "
                        "(repeat the option for a grid, e.g. --tune lr=0.01,0.05 --tune steps=300,1000)")
    p.add_argument("--seeds", type=int, default=3, help="training runs with seeds 0..N-1 (default 3)")
    p.add_argument("--ranking", action="store_true",
                   help="also score the set by the field's standard (DD-Ranking): the same recipe on a random "
                        "class-balanced subset of the same size, with hard labels, with the augmentation switched, "
                        "and on the set's images with one-hot labels: gain over random (IOR), HLR, LRS, ARS "
                        "(docs/TRANSFER.md)")
    p.add_argument("--full-set-accuracy", type=_number(0.0), default=None, metavar="FRACTION",
                   help="with --ranking: the full training set's hard-label test accuracy under the same recipe "
                        "(a record of benchmarks/ranking.py), for HLR and LRS")
    p.add_argument("--seed", type=int, default=0, help="seed of the natural subset")
    p.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only")
    p.add_argument("--out", default=None, help="folder for results.json and transfer_curve.png (new or empty)")
    _add_overwrite(p)
    _add_preprocess(p)
    _add_common(p, kernel_options=False)  # finite networks train in float32 and need no kernel memory budget

    p = sub.add_parser("report", help="a static HTML report of run folders (works offline, no server)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders holding results.json, or folders of them")
    p.add_argument("--out", required=True, help="report folder, new or empty (index.html, runs/, img/)")
    _add_overwrite(p, "report")
    p.add_argument("--zoo", action="store_true", help="add the distilled-set zoo's table and image grids")

    p = sub.add_parser("zoo", help="ready-made distilled sets shipped with kernel-distill (use them as zoo:NAME)")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND", parser_class=_OneLineErrorParser)
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
    _add_overwrite(q, "report")

    p = sub.add_parser("export", help="write a distilled set for PyTorch / Hugging Face users (docs/INTEROP.md)")
    p.add_argument("set", metavar="SET", help="a distilled-set .npz, a run folder, or zoo:NAME")
    p.add_argument("out", metavar="OUT",
                   help="safetensors: a .safetensors file; imagefolder, parquet: a folder (new or empty)")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="safetensors (tensors + preprocessing, exact), imagefolder (PNGs per class in pixel space "
                        "+ labels.csv) or parquet (one row per image, loadable with Hugging Face datasets)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (never another command's files)")
    p.add_argument("--data-dir", default=None, help="where zoo sets that are downloaded are kept")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("demo", help="the built-in example on scikit-learn's digits (no files needed)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, the shell's convention


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, a scheduler's preemption, a container stop) end a command the
    same way: the first one raises ``KeyboardInterrupt``, so a KIP run checkpoints and writes its outputs;
    later ones are ignored while that cleanup runs (a second Ctrl-C would otherwise land in the middle of a
    file write or a destructor, and print Python's "Exception ignored in ..."). The exit code says which
    signal came first: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self):
        self.received: int | None = None

    def handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(self.received, 130)

    @contextlib.contextmanager
    def installed(self, keep: bool = False):
        """Handle both signals in the ``with`` block; ``keep``: leave later signals ignored afterwards (the
        console script, whose interpreter shuts down next and must not be interrupted while it does)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle) for s in EXIT_SIGNAL}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if keep and self.received is not None else handler)


def main(argv: list[str] | None = None, *, _keep_signal_handlers: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["kernel-distill", *(sys.argv[1:] if argv is None else argv)]  # for results.json
    if args.command != "kip" and hasattr(args, "zca_reg"):  # kip resolves its own defaults (a resume keeps them)
        args.zca_reg_given = args.zca_reg is not None
        args.zca_reg = DEFAULT_ZCA_REG if args.zca_reg is None else args.zca_reg
    signals = _Signals()
    try:
        with signals.installed(keep=_keep_signal_handlers):
            return _run_command(args)
    except KeyboardInterrupt:
        print("kernel-distill: interrupted", file=sys.stderr)
        return signals.exit_code()


def _run_command(args) -> int:
    from kernel_distill.results import capture_code_version

    capture_code_version()
    try:
        if getattr(args, "float64", False):
            import jax

            jax.config.update("jax_enable_x64", True)
        return _COMMANDS[args.command](args)
    except KernelDistillError as e:
        print(f"kernel-distill: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # no space, no permission, not a folder: the path and the reason, not a traceback
        from kernel_distill.runs import describe_os_error

        print(f"kernel-distill: error: {describe_os_error(e, 'file error on')}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a JAX out-of-memory error is the user's to fix, not a bug to dump on them
        if "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError):
            print("kernel-distill: error: out of memory; lower --memory-budget-mb, the batch or the "
                  "support size", file=sys.stderr)
            return EXIT_USAGE
        raise


# ----------------------------------------------------------------------------------------------------


def _spec_from_args(args, fallback: dict | None = None):
    """The kernel the options ask for; options not given fall back to ``fallback`` (a file's or a run's
    recorded kernel) when it names the same kernel."""
    from kernel_distill.kernels import KernelSpec, RandomFeatures

    fallback = fallback or {}
    fallback_rf = fallback.get("random_features")
    fallback_name = fallback.get("architecture", "fc") + ("-rf" if fallback_rf else "")
    name = args.kernel or fallback_name
    random = name.endswith("-rf")
    architecture = name[:-3] if random else name
    same_architecture = fallback.get("architecture") == architecture
    kwargs = dict(architecture=architecture)
    depth = args.depth if args.depth is not None else (fallback.get("depth") if same_architecture else None)
    kwargs["depth"] = depth
    for option in ("W_std", "b_std"):
        value = getattr(args, option)
        if value is None and same_architecture:
            value = fallback.get(option)
        if value is not None:
            kwargs[option] = value
    rf_options = dict(models=getattr(args, "rf_models", None), width=getattr(args, "rf_width", None),
                      seed=getattr(args, "rf_seed", None), norm=getattr(args, "rf_norm", None))
    if random:
        base = dict(fallback_rf) if (fallback_rf and name == fallback_name) else {}
        base.update({k: v for k, v in rf_options.items() if v is not None})
        kwargs["random_features"] = RandomFeatures(**base)
    elif any(v is not None for v in rf_options.values()):
        raise KernelDistillError(f"--rf-models, --rf-width, --rf-seed and --rf-norm need a random-feature kernel "
                                 f"(--kernel {architecture}-rf), not {name}")
    return KernelSpec(**kwargs)


def _default_get(args, spec) -> str:
    return args.get or ("nngp" if spec.random_features is not None else "ntk")


def _kernel_fn(args, spec):
    from kernel_distill.kernels import make_kernel_fn

    return make_kernel_fn(spec, memory_budget_bytes=int(_memory_budget_mb(args) * 2**20))


def _memory_budget_mb(args) -> float:
    from kernel_distill.kernels import default_memory_budget_mb

    if args.memory_budget_mb is None:
        return default_memory_budget_mb()
    if args.memory_budget_mb < 1:  # below a MiB a kernel tile holds nothing
        raise KernelDistillError(f"--memory-budget-mb must be at least 1 (MiB), got {args.memory_budget_mb:g}")
    return args.memory_budget_mb


def _dtype(args):
    return np.float64 if getattr(args, "float64", False) else np.float32


def _check_positive(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise KernelDistillError(f"{name} must be a positive integer, got {value}")


def _distilled_path(text: str, args):
    """A distilled-set argument as a file: ``zoo:NAME`` is the zoo's verified copy, anything else a path."""
    from kernel_distill import zoo

    return zoo.resolve(text, getattr(args, "data_dir", None), progress=not getattr(args, "no_progress", False))


def _cmd_datasets(args) -> int:
    from kernel_distill.data import available_datasets, check_data_dir_exists

    root = check_data_dir_exists(args.data_dir)
    print(f"data directory: {root}{'' if root.is_dir() else ' (not created yet: downloads create it)'}")
    rows = available_datasets(args.data_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['status']:<34} {r['location']}")
    return 0


def _finish(args, record: dict, out=None) -> None:
    """Write ``out/results.json`` when there is an output folder; print the record with ``--json``."""
    from kernel_distill.results import write_results

    if out is not None:
        write_results(out, record)
    if args.json:
        print(json.dumps(record))


def _cmd_evaluate(args) -> int:
    from kernel_distill.io import dataset_of, load_distilled

    _check_positive("--test-limit", args.test_limit)
    _backend_options(args)
    distilled = load_distilled(_distilled_path(args.file, args))
    args.dataset = dataset_of(distilled, args.file, args.dataset)
    _refuse_preprocessing_options(args, distilled, args.file)
    with _output_folder(args, "evaluate"):
        return _evaluate(args, distilled)


def _output_folder(args, command: str, out=None):
    """Create, test and lock the command's output folder before any computation (nothing without one)."""
    from kernel_distill.runs import claim_output_folder

    out = args.out if out is None else out
    return (claim_output_folder(out, command, overwrite=args.overwrite) if out is not None
            else contextlib.nullcontext())


def _evaluate(args, distilled) -> int:
    from kernel_distill import experiments
    from kernel_distill.data import limit_test
    from kernel_distill.krr import DEFAULT_REG
    from kernel_distill.results import dataset_record, make_record, split_checksum

    start = time.perf_counter()
    preprocessor = experiments.preprocessing_for(distilled, args.file, args.dataset, args.data_dir, args.zca,
                                                 args.zca_reg, progress=not args.no_progress)
    x_test, y_test = experiments.load_test_split(args.dataset, args.data_dir, None, not args.no_progress)
    checksum = split_checksum(x_test, y_test)
    if args.test_limit:
        x_test, y_test = limit_test(x_test, y_test, args.test_limit)
    meta = distilled.metadata
    spec = _spec_from_args(args, meta.get("kernel"))
    get = args.get or (meta.get("get", "ntk") if args.kernel is None else _default_get(args, spec))
    reg = args.reg if args.reg is not None else meta.get("reg", DEFAULT_REG)
    with _open_backend(args) as backend:
        result = experiments.evaluate_distilled(distilled, preprocessor, x_test, y_test, _kernel_fn(args, spec), reg,
                                                get, _dtype(args), progress=not args.no_progress, backend=backend)
    metrics = result["metrics"]
    print(f"{args.file}: {len(distilled.images)} support images, {spec.description} {get.upper()} "
          f"(depth {spec.depth}), reg {reg:g}: test accuracy {100 * metrics['test_accuracy']:.2f}% on "
          f"{metrics['num_test']} {args.dataset} test images ({result['seconds']:.1f} s)")
    config = dict(file=str(args.file), kernel=spec.to_dict(), get=get, reg=reg, test_limit=args.test_limit,
                  file_metadata=meta)
    record = make_record("evaluate", "file", dataset_record(args.dataset, dict(test=checksum),
                                                            num_test=metrics["num_test"]),
                         metrics, config, dtype=_dtype(args).__name__, wall_seconds=time.perf_counter() - start,
                         argv=args.command_line)
    _finish(args, record, args.out)
    return 0


def _cmd_baseline(args) -> int:
    from kernel_distill.data import dataset_info

    _check_positive("--per-class", args.per_class, allow_none=False)
    _check_positive("--seeds", args.seeds, allow_none=False)
    _check_positive("--test-limit", args.test_limit)
    _backend_options(args)
    dataset_info(args.dataset)
    with _output_folder(args, "baseline"):
        return _baseline(args)


def _baseline(args) -> int:
    from kernel_distill import experiments
    from kernel_distill.io import save_distilled
    from kernel_distill.krr import DEFAULT_REG
    from kernel_distill.results import dataset_record, make_record

    spec = _spec_from_args(args)
    get, reg = _default_get(args, spec), args.reg if args.reg is not None else DEFAULT_REG
    start = time.perf_counter()
    with _open_backend(args) as backend:
        result = experiments.natural_baseline(args.dataset, args.per_class, args.seeds, _kernel_fn(args, spec), reg,
                                              get, args.data_dir, args.zca, args.zca_reg, args.test_limit,
                                              _dtype(args), progress=not args.no_progress, backend=backend)
    metrics = result["metrics"]
    acc = 100 * np.asarray(metrics["test_accuracies"])
    print(f"{args.dataset}, {args.per_class} per class, {spec.description} {get.upper()} depth {spec.depth}: "
          f"{acc.mean():.2f} +- {100 * metrics['test_accuracy_std']:.2f}% over {len(acc)} seeds "
          f"({metrics['num_test']} test images)")
    config = dict(per_class=args.per_class, seeds=args.seeds, kernel=spec.to_dict(), get=get, reg=reg, zca=args.zca,
                  zca_reg=args.zca_reg, test_limit=args.test_limit)
    artifacts = {}
    if args.out:
        out = pathlib.Path(args.out)
        meta = dict(dataset=args.dataset, method="natural", per_class=args.per_class, seed=0, kernel=spec.to_dict(),
                    get=get, reg=reg, metrics=dict(test_accuracy=metrics["test_accuracies"][0]))
        first = result["first_subset"]
        save_distilled(out / "natural.npz", type(first)(first.images, first.labels, first.preprocessor, meta))
        artifacts["distilled"] = "natural.npz"
        print(f"outputs in {out}: natural.npz (the seed-0 subset), results.json")
    record = make_record("baseline", "natural", dataset_record(args.dataset, result["checksums"],
                                                               num_test=metrics["num_test"]),
                         metrics, config, artifacts=artifacts, dtype=_dtype(args).__name__,
                         wall_seconds=time.perf_counter() - start, argv=args.command_line)
    _finish(args, record, args.out)
    return 0


def _cmd_zoo(args) -> int:
    from kernel_distill import zoo

    if args.zoo_command == "list":
        entries = zoo.read_index()
        if args.json:
            print(json.dumps(entries))
            return 0
        if not entries:
            print("the zoo is empty")
            return 0
        rows = [[c.strip("`") for c in row] for row in zoo.table_rows(entries)]
        header = zoo.TABLE_HEADER
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        print("KRR %: the set's own kernel on the whole test set; transfer %: "
              f"{entries[0].get('transfer', {}).get('model', 'evalnet') if entries[0].get('transfer') else 'evalnet'}"
              " trained on the set, mean +- std over seeds (kernel-distill zoo show NAME for the protocol)")
        print("use a set as zoo:NAME, e.g. kernel-distill evaluate zoo:" + entries[0]["name"])
        return 0
    if args.zoo_command == "show":
        e = zoo.entry(args.name)
        if args.json:
            print(json.dumps(e))
            return 0
        print(json.dumps(e, indent=2))
        return 0
    if args.zoo_command == "report":
        from kernel_distill.report import build_zoo_report

        from kernel_distill.runs import claim_output_folder

        with claim_output_folder(args.out, "report", overwrite=args.overwrite):
            print(f"zoo report: {build_zoo_report(args.out).resolve()}")
        return 0
    destination = zoo.export(args.name, args.path, overwrite=args.overwrite)
    print(f"zoo:{args.name} -> {destination} (sha256 {zoo.entry(args.name)['sha256']})")
    return 0


def _cmd_export(args) -> int:
    from kernel_distill import export
    from kernel_distill.runs import claim_output_file, claim_output_folder

    if args.format == "safetensors":
        if not str(args.out).endswith(".safetensors"):
            raise KernelDistillError(f"OUT {args.out}: a safetensors export is one file; give a path ending in "
                                     f".safetensors")
        claim = claim_output_file(args.out, overwrite=args.overwrite, option="OUT")
    else:
        claim = claim_output_folder(args.out, "export", overwrite=args.overwrite, option="OUT")
    src = export.load_source(args.set, args.data_dir, progress=not args.no_progress)
    with claim:
        summary = export.export(src, args.out, args.format)
    n, k = src.distilled.images.shape[0], src.distilled.num_classes
    print(f"{args.set}: {n} images, {k} classes -> {summary['path']} ({args.format}; source sha256 "
          f"{src.sha256[:12]}...)")
    if summary.get("why"):
        print(f"note: {summary['why']}")
    if summary.get("clipped_fraction"):
        print(f"note: {100 * summary['clipped_fraction']:.2f}% of the pixel values lay outside [0, 1] and were "
              f"clipped in the PNGs (the safetensors and parquet exports keep them exactly)")
    return 0


def _cmd_demo(args) -> int:
    """KIP on scikit-learn's digits (bundled, no files): 10 learned images and labels per class."""
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.kip import KipConfig, prepare_for, run_kip

    from kernel_distill.runs import check_output_path

    out = check_output_path(args.out)
    config = KipConfig(dataset="digits", per_class=10, kernel=KernelSpec("fc"), learn_labels=True, steps=1000,
                       eval_every=100, checkpoint_every=100)
    data = prepare_for(config, progress=False)
    start = time.perf_counter()
    summary = run_kip(config, data, out, progress=not args.no_progress, overwrite=args.overwrite,
                      command_line=args.command_line)
    print(f"KIP on digits ({len(data.y_train):,} training images -> 10 per class, {data.num_val} held out for "
          f"validation), FC NTK, {summary['step']} steps in {time.perf_counter() - start:.0f} s: KRR test accuracy "
          f"{100 * summary['last_accuracy']:.2f}% (final), {100 * summary['best_test_accuracy']:.2f}% "
          f"(validation-best, step {summary['best_step']}) on {len(data.y_test)} test images")
    print(f"outputs in {out}/: distilled.npz, distilled_best.npz, grid.png, curve.png, metrics.jsonl, results.json")
    print("MNIST: KERNEL_DISTILL_DATA=DIR .venv/bin/kernel-distill kip --dataset mnist --per-class 10 "
          "--learn-labels --steps 2000 --out runs/mnist-fc-10")
    from kernel_distill.report import build_report

    from kernel_distill.runs import claim_output_folder

    with claim_output_folder(out / "report", "report", overwrite=args.overwrite):
        index = build_report([out], out / "report")
    print(f"report (open in a browser): {index.resolve()}")
    return 0


def _cmd_label_solve(args) -> int:
    from kernel_distill.io import check_preprocessing_request, dataset_of, load_distilled

    for name in ("--train-limit", "--test-limit"):
        _check_positive(name, getattr(args, name[2:].replace("-", "_")))
    _check_positive("--block-size", args.block_size, allow_none=False)
    _backend_options(args)
    given = None
    if args.support:
        given = load_distilled(_distilled_path(args.support, args))
        dataset_of(given, args.support, args.dataset)
        check_preprocessing_request(given, args.support, args.zca)
        _refuse_preprocessing_options(args, given, args.support)
        if args.seed is not None:
            raise KernelDistillError(f"--seed draws a natural support; with --support the images are "
                                     f"{args.support}'s: drop --seed")
        size = len(given.images)
    else:
        _check_positive("--support-size", args.support_size, allow_none=False)
        size = args.support_size
    if args.seed is None:
        args.seed = 0
    if args.train_limit is not None and args.train_limit < size:
        raise KernelDistillError(f"--train-limit {args.train_limit} gives fewer training targets than the {size} "
                                 f"support images: their labels would be underdetermined; use --train-limit {size} "
                                 f"or more")
    out = args.out if args.out is not None else f"runs/ls-{args.dataset}-{size}"
    with _output_folder(args, "label-solve", out) as folder:  # checked and locked before the solve
        return _label_solve(args, given, folder)


def _label_solve(args, given, out: pathlib.Path) -> int:
    from kernel_distill import experiments, plots
    from kernel_distill.data import prepare_dataset
    from kernel_distill.io import DistilledSet, save_distilled
    from kernel_distill.krr import DEFAULT_REG
    from kernel_distill.preprocess import centered_one_hot
    from kernel_distill.results import dataset_record, make_record

    start = time.perf_counter()
    # A support file's own preprocessing maps the training and test images into its space.
    data = prepare_dataset(args.dataset, args.data_dir, zca=args.zca, zca_reg=args.zca_reg,
                           test_limit=args.test_limit, progress=not args.no_progress,
                           preprocessor=given.preprocessor if given is not None else None)
    spec = _spec_from_args(args)
    get = _default_get(args, spec)
    reg = args.reg if args.reg is not None else DEFAULT_REG
    kernel_fn = _kernel_fn(args, spec)
    if given is not None:
        if given.images.shape[1:] != data.x_train.shape[1:] or given.num_classes != data.num_classes:
            raise KernelDistillError(f"{args.support} does not match {args.dataset}: images "
                                     f"{given.images.shape[1:]}, {given.num_classes} label columns")
        x_support = given.images.astype(_dtype(args))
        original = centered_one_hot(given.labels.argmax(axis=1), data.num_classes)
    else:
        x_support, original = experiments.natural_support(data, args.support_size, args.seed, _dtype(args))
    with _open_backend(args) as backend:
        result = experiments.label_solve_on(data, kernel_fn, x_support, original, reg, args.ls_reg, get,
                                            args.train_limit, args.block_size, _dtype(args), not args.no_progress,
                                            backend=backend)
    metrics = result["metrics"]
    config = dict(support=args.support, support_size=len(x_support), seed=args.seed, kernel=spec.to_dict(), get=get,
                  reg=reg, ls_reg=args.ls_reg, zca=args.zca, zca_reg=args.zca_reg, train_limit=args.train_limit,
                  test_limit=args.test_limit, block_size=args.block_size)
    meta = dict(dataset=args.dataset, method="label_solve", seed=args.seed, kernel=spec.to_dict(), get=get, reg=reg,
                ls_reg=args.ls_reg, metrics=metrics)
    save_distilled(out / "distilled.npz", DistilledSet(x_support, result["labels"], data.preprocessor, meta))
    plots.save_figure(out / "label_covariance.png", plots.heatmap_figure(
        result["covariance"], "original class (one-hot)", "solved label column", data.class_names,
        title=f"Label Solve, {args.dataset}, support {len(x_support)}"))
    print(f"Label Solve on {args.dataset}: support {len(x_support)}, {metrics['num_train']} training images, "
          f"{spec.description} {get.upper()}, {metrics['solve_seconds']:.1f} s, peak memory "
          f"{metrics['peak_rss_mb']:.0f} MB")
    print(f"KRR test accuracy: original labels {100 * metrics['test_accuracy_original_labels']:.2f}%, solved labels "
          f"{100 * metrics['test_accuracy']:.2f}% ({metrics['num_test']} test images)")
    record = make_record("label-solve", "label_solve",
                         dataset_record(args.dataset, data.checksums, num_train=metrics["num_train"],
                                        num_test=metrics["num_test"]),
                         metrics, config, curves=dict(label_covariance=result["covariance"]),
                         artifacts=dict(distilled="distilled.npz", label_covariance="label_covariance.png"),
                         dtype=_dtype(args).__name__, wall_seconds=time.perf_counter() - start, argv=args.command_line)
    _finish(args, record, out)
    print(f"outputs in {out}: distilled.npz, label_covariance.png, results.json")
    return 0


def _cmd_transfer(args) -> int:
    from kernel_distill.finite import TrainConfig, default_learning_rate

    _check_positive("--seeds", args.seeds, allow_none=False)
    for name in ("--test-limit", "--width", "--depth", "--natural-per-class"):
        _check_positive(name, getattr(args, name[2:].replace("-", "_")))
    # Before any data is loaded, so that a bad training setting fails at once.
    config = TrainConfig(steps=args.steps, optimizer=args.optimizer,
                         learning_rate=default_learning_rate(args.model) if args.lr is None else args.lr,
                         weight_decay=args.weight_decay, loss=args.loss, batch_size=args.batch_size,
                         eval_every=args.eval_every, augment=args.augment, label_scale=args.label_scale)
    if (args.file is None) == (args.natural_per_class is None):
        raise KernelDistillError("give a distilled-set FILE or --natural-per-class N (not both)")
    if args.ranking and args.file is None:
        raise KernelDistillError("--ranking scores a distilled set against random subsets: give a FILE")
    if args.full_set_accuracy is not None and not (args.ranking and args.full_set_accuracy <= 1):
        raise KernelDistillError("--full-set-accuracy is a fraction in [0, 1] and goes with --ranking")
    if args.ranking and args.tune:
        raise KernelDistillError("--ranking scores one fixed recipe; choose it first with --tune, then give it")
    args.tune_grid = _tune_grid(args.tune, config)
    if args.val_size is None:
        args.val_size = 5000 if args.tune_grid else 0
    if args.val_size < 0:
        raise KernelDistillError(f"--val-size must be 0 or positive, got {args.val_size}")
    if args.tune_grid and not args.val_size:
        raise KernelDistillError("--tune needs a validation split: --val-size must be positive")
    with _output_folder(args, "transfer"):
        return _transfer(args, config)


def _tune_grid(options, config) -> dict | None:
    """``--tune NAME=V1,V2`` options as ``{NAME: [V1, V2]}``, each candidate checked before data is loaded."""
    from kernel_distill.experiments import TUNABLE, tuning_candidates

    if not options:
        return None
    grid = {}
    for option in options:
        name, sep, values = option.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise KernelDistillError(f"--tune takes NAME=V1,V2,..., got {option!r}")
        if name not in TUNABLE:
            raise KernelDistillError(f"--tune cannot tune {name!r}; tunable: {', '.join(TUNABLE)}")
        if name in grid:
            raise KernelDistillError(f"--tune {name} given twice")
        try:
            grid[name] = [TUNABLE[name][1](v.strip()) for v in values.split(",")]
        except ValueError:
            raise KernelDistillError(f"--tune {name}: cannot read {values!r} as a list of "
                                     f"{TUNABLE[name][1].__name__} values") from None
    tuning_candidates(config, grid)  # TrainConfig checks every value (a negative lr, an unknown loss, ...)
    return grid


def _transfer(args, config) -> int:
    from kernel_distill import experiments, plots
    from kernel_distill.io import load_distilled
    from kernel_distill.results import dataset_record, make_record

    start = time.perf_counter()
    distilled = load_distilled(_distilled_path(args.file, args)) if args.file else None
    if distilled is not None:
        _refuse_preprocessing_options(args, distilled, args.file)
    support = experiments.transfer_support(distilled, args.file,
                                           args.dataset, args.natural_per_class, args.seed, args.data_dir, args.zca,
                                           args.zca_reg, progress=not args.no_progress, val_size=args.val_size)
    result = experiments.transfer(support, args.model, config, args.seeds, args.width, args.depth,
                                  args.parameterization, args.data_dir, args.test_limit, not args.no_progress,
                                  tune_grid=args.tune_grid)
    ranking = None
    if args.ranking:
        ranking = experiments.ranking_runs(support, args.model, config, args.seeds, args.width, args.depth,
                                           args.parameterization, args.data_dir, args.test_limit,
                                           args.full_set_accuracy, progress=not args.no_progress)
        result["metrics"].update({f"ranking_{k}": v for k, v in ranking["scores"].items()})
        result["metrics"].update({f"ranking_accuracy_{k}": v for k, v in ranking["accuracies"].items()})
        _print_ranking(ranking)
    metrics, dataset, source = result["metrics"], support["dataset"], support["source"]
    if result["tuning"]:
        chosen = result["tuning"]["candidates"][result["tuning"]["best"]]
        print(f"protocol chosen on {metrics['num_val']} validation images (test set not used): "
              f"{' '.join(f'{k}={v}' for k, v in chosen['changes'].items())} "
              f"({100 * chosen['val_accuracy']:.2f}% on validation)")
    if "val_accuracy" in metrics:
        print(f"validation accuracy {100 * metrics['val_accuracy']:.2f}% over {args.seeds} seeds")
    print(f"{args.model} ({metrics['num_parameters']:,} parameters) trained {result['train']['steps']} steps on {source}: test "
          f"accuracy {100 * metrics['test_accuracy']:.2f} +- {100 * metrics['test_accuracy_std']:.2f}% over "
          f"{args.seeds} seeds on {metrics['num_test']} {dataset} test images ({metrics['train_seconds']:.0f} s "
          f"training, {metrics['eval_seconds']:.0f} s testing)")
    run_config = dict(source=source, file=args.file, natural_per_class=args.natural_per_class, seed=args.seed,
                      model=args.model, width=args.width, depth=args.depth, parameterization=args.parameterization,
                      seeds=args.seeds, train=result["train"], zca=args.zca, zca_reg=args.zca_reg,
                      test_limit=args.test_limit, val_size=args.val_size, tuning=result["tuning"],
                      ranking=ranking and dict(runs=ranking["runs"], stds=ranking["stds"],
                                               toggled_augment=ranking["toggled_augment"],
                                               full_set_accuracy=args.full_set_accuracy))
    curves = {f"transfer_test_accuracy_seed{r['seed']}": r["curve"] for r in result["runs"]}
    artifacts = {}
    if args.out:
        out = pathlib.Path(args.out)
        plots.save_figure(out / "transfer_curve.png", plots.transfer_figure(
            curves, title=f"{args.model} on {source}"))
        artifacts["transfer_curve"] = "transfer_curve.png"
        print(f"outputs in {out}: results.json, transfer_curve.png")
    record = make_record("transfer", "transfer", dataset_record(dataset, result["checksums"],
                                                                num_test=metrics["num_test"]),
                         metrics, run_config, curves=curves, artifacts=artifacts, dtype="float32",
                         selection=dict(split="validation", num_val=metrics["num_val"]) if result["tuning"] else None,
                         wall_seconds=time.perf_counter() - start, argv=args.command_line)
    _finish(args, record, args.out)
    return 0


def _print_ranking(ranking: dict) -> None:
    acc, scores = ranking["accuracies"], ranking["scores"]
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())
    print(f"DD-Ranking runs (test accuracy, mean over seeds): {shown}")
    parts = [f"IOR {100 * scores['ior']:+.2f} points"] if "ior" in scores else []
    if "hlr" in scores:
        parts.append(f"HLR {100 * scores['hlr']:.2f} points")
    for key in ("lrs", "ars"):
        if key in scores:
            parts.append(f"{key.upper()} {100 * scores[key]:.2f}%")
    if "hlr" not in scores:
        parts.append("HLR and LRS need --full-set-accuracy")
    print("DD-Ranking scores: " + "; ".join(parts))


def _cmd_report(args) -> int:
    from kernel_distill.report import build_report, find_runs

    from kernel_distill.runs import claim_output_folder

    with claim_output_folder(args.out, "report", overwrite=args.overwrite):
        index = build_report(args.runs, args.out, zoo=args.zoo)
    print(f"report of {len(find_runs(args.runs))} run(s){' and the zoo' if args.zoo else ''}: {index.resolve()}")
    return 0


def _kip_config_from_args(args, base=None):
    from kernel_distill.kip import KipConfig

    # a new run gets the device's default; a resumed one keeps its own unless the option is given
    budget = None if base is not None and args.memory_budget_mb is None else _memory_budget_mb(args)
    base = base.to_dict() if base is not None else KipConfig().to_dict()
    overrides = dict(dataset=args.dataset, per_class=args.per_class, learn_labels=args.learn_labels, init=args.init,
                     target_batch_size=args.target_batch, learning_rate=args.lr, reg=args.reg, zca=args.zca,
                     zca_reg=args.zca_reg, seed=args.seed, steps=args.steps, eval_every=args.eval_every,
                     checkpoint_every=args.checkpoint_every, get=args.get, test_limit=args.test_limit,
                     memory_budget_mb=budget, select_on=args.select_on, val_size=args.val_size,
                     float64=True if args.float64 else None,
                     rf_fixed_networks=True if args.rf_fixed_networks else None, loss=args.loss)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.init_from is not None:
        from kernel_distill.zoo import file_sha256

        if args.init is not None:
            raise KernelDistillError("--init and --init-from are alternatives: give one")
        init_file = str(pathlib.Path(_distilled_path(args.init_from, args)).resolve())
        if not pathlib.Path(init_file).is_file():
            raise KernelDistillError(f"--init-from: {args.init_from}: no such file")
        base.update(init="file", init_file=init_file, init_sha256=file_sha256(init_file))
    kernel_options = (args.kernel, args.depth, args.W_std, args.b_std, args.rf_models, args.rf_width, args.rf_seed,
                      args.rf_norm)
    if any(v is not None for v in kernel_options):
        spec = _spec_from_args(args, base["kernel"])
        base["kernel"] = spec.to_dict()
        if args.get is None and spec.random_features is not None:
            base["get"] = "nngp"
    return KipConfig.from_dict(base)


def _cmd_kip(args) -> int:
    from kernel_distill.kip import RUN_FILES, check_resume, load_checkpoint, prepare_for, run_kip
    from kernel_distill.runs import claim_run_folder

    _check_positive("--test-limit", args.test_limit)
    _backend_options(args)
    if args.resume is not None:
        if args.out is not None:
            raise KernelDistillError(f"--out cannot be used with --resume: the run continues in {args.resume}")
        if args.overwrite:
            raise KernelDistillError("--overwrite cannot be used with --resume")
        out = args.resume
        claim = claim_run_folder(out, resume=True)
    else:
        config = _kip_config_from_args(args)
        out = args.out if args.out is not None else f"runs/kip-{config.dataset}-{config.per_class}"
        claim = claim_run_folder(out, overwrite=args.overwrite, run_files=RUN_FILES, command="kip")
    # The folder is checked, locked and (on resume) the request compared before any data is loaded.
    with claim:
        if args.resume is not None:
            saved, _ = load_checkpoint(out)
            config = _kip_config_from_args(args, saved)
            check_resume(out, config)
        if args.backend != "local" and config.kernel.random_features is not None:
            raise KernelDistillError(f"KIP with the {config.kernel.name} kernel runs on the local backend only; "
                                     f"drop --backend {args.backend}")
        data = prepare_for(config, args.data_dir, progress=not args.no_progress)
        start = time.perf_counter()
        with _open_backend(args) as backend:
            summary = run_kip(config, data, out, resume=args.resume is not None, overwrite=args.overwrite,
                              progress=not args.no_progress, command_line=args.command_line, backend=backend)
    summary["seconds"] = time.perf_counter() - start
    chosen = "validation" if config.select_on == "validation" else "TEST (as the KIP papers did)"
    print(f"KIP {config.dataset}, {config.per_class}/class, {config.kernel.description} {config.get.upper()}, "
          f"{summary['step']} steps in {summary['seconds']:.0f} s: test accuracy {100 * summary['last_accuracy']:.2f}% "
          f"(final), {100 * summary['best_test_accuracy']:.2f}% (best on {chosen}, step {summary['best_step']})")
    print(f"outputs in {out}: distilled.npz, distilled_best.npz, grid.png, curve.png, metrics.jsonl, config.json, "
          f"results.json")
    if args.json:
        from kernel_distill.results import read_results

        print(json.dumps(read_results(out)))
    return 0


_COMMANDS = {
    "datasets": _cmd_datasets,
    "evaluate": _cmd_evaluate,
    "export": _cmd_export,
    "baseline": _cmd_baseline,
    "demo": _cmd_demo,
    "kip": _cmd_kip,
    "label-solve": _cmd_label_solve,
    "report": _cmd_report,
    "transfer": _cmd_transfer,
    "zoo": _cmd_zoo,
}


def entry_point():  # console script
    sys.exit(main(_keep_signal_handlers=True))


if __name__ == "__main__":
    entry_point()
