"""The ``kernel-distill`` command line.

Every user-facing failure (bad argument, missing or malformed file, impossible request) prints one line,
``kernel-distill: error: ...``, and exits with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
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


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill)")
    p.add_argument("--float64", action="store_true", help="compute kernels and solves in float64")
    p.add_argument("--memory-budget-mb", type=POSITIVE, default=512.0,
                   help="memory bound for one block of the kernel computation (default 512)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def _add_kernel(p: argparse.ArgumentParser, default_kernel: str | None = "fc"):
    p.add_argument("--kernel", choices=("fc", "convnet", "convnet3"), default=default_kernel,
                   help="infinite network: fc, convnet (KIP ConvNet) or convnet3 (without the first conv)")
    p.add_argument("--get", choices=("ntk", "nngp"), default=None, help="which kernel (default ntk)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (fc, default 1) or conv blocks (3)")
    p.add_argument("--W-std", dest="W_std", type=POSITIVE, default=None, help="weight std (default sqrt(2))")
    p.add_argument("--b-std", dest="b_std", type=NON_NEGATIVE, default=None, help="bias std (default 0.1)")
    p.add_argument("--reg", type=NON_NEGATIVE, default=None, help="KRR regulariser relative to trace(K)/n (1e-6)")


def _add_preprocess(p: argparse.ArgumentParser):
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the images (KIP's zca_normalize)")
    p.add_argument("--zca-reg", type=POSITIVE, default=0.1, help="ZCA regulariser relative to trace(C)/d (0.1)")


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
    p.add_argument("--data-dir", default=None)

    p = sub.add_parser("evaluate", help="KRR test accuracy of a distilled set (.npz)")
    p.add_argument("file", help="distilled set: a kernel-distill .npz or a released KIP .npz")
    p.add_argument("--dataset", required=True, help="dataset whose test split is used")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    _add_kernel(p, default_kernel=None)
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("baseline", help="KRR accuracy of random natural class-balanced subsets")
    p.add_argument("--dataset", required=True)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5, help="number of random subsets (seeds 0..N-1)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--out", default=None, help="save the subset of seed 0 as a distilled-set .npz")
    _add_kernel(p)
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("kip", help="distill a dataset with KIP (learn support images, optionally labels)")
    p.add_argument("--dataset", default=None, help="dataset to distill (default digits)")
    p.add_argument("--per-class", type=int, default=None, help="support images per class (default 10)")
    p.add_argument("--learn-labels", action="store_true", default=None, help="also learn the support labels")
    p.add_argument("--init", choices=("real", "noise"), default=None,
                   help="support initialisation: random real training images (default) or Gaussian noise")
    p.add_argument("--target-batch", type=int, default=None,
                   help="class-balanced target images per step (default 5000, capped by the smallest class)")
    p.add_argument("--lr", type=POSITIVE, default=None, help="Adam learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="total steps (default 1000; with --resume: new total)")
    p.add_argument("--eval-every", type=int, default=None, help="test-set evaluation interval (default 100)")
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
    p.add_argument("--dataset", required=True)
    p.add_argument("--support-size", type=int, default=100,
                   help="class-balanced natural support size (a multiple of the number of classes; default 100)")
    p.add_argument("--support", default=None, help="use the images of this distilled-set .npz as the support")
    p.add_argument("--seed", type=int, default=0, help="seed of the natural support sample")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--block-size", type=int, default=5000, help="training images per kernel block (5000)")
    p.add_argument("--ls-reg", type=NON_NEGATIVE, default=1e-6,
                   help="ridge on K_st K_ts, relative to its trace / n (default 1e-6)")
    p.add_argument("--out", default=None, help="output folder (default runs/ls-DATASET-SIZE)")
    _add_kernel(p)
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("transfer", help="train finite networks on a distilled set; report real test accuracy")
    p.add_argument("file", nargs="?", default=None, help="distilled set (.npz); omit with --natural-per-class")
    p.add_argument("--dataset", default=None, help="test data (default: the file's metadata)")
    p.add_argument("--natural-per-class", type=int, default=None,
                   help="instead of a file, a random natural class-balanced subset of this size (baseline)")
    p.add_argument("--model", choices=("convnet", "convnet3", "fc", "evalnet"), default="convnet")
    p.add_argument("--width", type=int, default=None, help="channels / units (convnet 128, fc 1024)")
    p.add_argument("--depth", type=int, default=None, help="conv blocks (3) or hidden layers (1)")
    p.add_argument("--parameterization", choices=("standard", "ntk"), default="standard")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="learning rate (default 0.05; 0.01 for convnet and convnet3, which have no normalisation)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=5e-4)
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="mse on the (learned) labels or cross-entropy on their argmax")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the natural subset")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for transfer_metrics.json and transfer_curve.png")
    _add_preprocess(p)
    _add_common(p)

    p = sub.add_parser("demo", help="the built-in example on scikit-learn's digits (no files needed)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo run already in --out")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "float64", False):
            import jax

            jax.config.update("jax_enable_x64", True)
        return _COMMANDS[args.command](args)
    except KernelDistillError as e:
        print(f"kernel-distill: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kernel-distill: interrupted", file=sys.stderr)
        return 130
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
    from kernel_distill.kernels import KernelSpec

    fallback = fallback or {}
    architecture = args.kernel or fallback.get("architecture", "fc")
    kwargs = dict(architecture=architecture)
    depth = args.depth if args.depth is not None else (
        fallback.get("depth") if fallback.get("architecture") == architecture else None)
    kwargs["depth"] = depth
    for name in ("W_std", "b_std"):
        value = getattr(args, name)
        if value is None and fallback.get("architecture") == architecture:
            value = fallback.get(name)
        if value is not None:
            kwargs[name] = value
    return KernelSpec(**kwargs)


def _kernel_fn(args, spec):
    from kernel_distill.kernels import make_kernel_fn

    if args.memory_budget_mb <= 0:
        raise KernelDistillError("--memory-budget-mb must be positive")
    return make_kernel_fn(spec, memory_budget_bytes=int(args.memory_budget_mb * 2**20))


def _dtype(args):
    return np.float64 if getattr(args, "float64", False) else np.float32


def _check_positive(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise KernelDistillError(f"{name} must be a positive integer, got {value}")


def _cmd_datasets(args) -> int:
    from kernel_distill.data import available_datasets, resolve_data_dir

    print(f"data directory: {resolve_data_dir(args.data_dir)}")
    rows = available_datasets(args.data_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['status']:<34} {r['location']}")
    return 0


def _preprocessing_for(distilled, path, dataset: str, args):
    """Check a loaded distilled set against ``dataset``; return the preprocessing that maps its test images.

    A file without preprocessing (a released KIP file) gets it fitted on the training set (``--zca`` /
    ``--zca-reg`` say how).
    """
    from kernel_distill.data import dataset_info, load_dataset
    from kernel_distill.preprocess import fit_preprocessor

    info = dataset_info(dataset)
    if distilled.num_classes != info.num_classes:
        raise KernelDistillError(f"{path} has {distilled.num_classes} label columns, {dataset} has "
                                 f"{info.num_classes} classes")
    if distilled.images.shape[1:] != info.image_shape:
        raise KernelDistillError(f"{path} holds images of shape {distilled.images.shape[1:]}, "
                                 f"{dataset} images are {info.image_shape}")
    preprocessor = distilled.preprocessor
    if preprocessor is None:
        # A released KIP file: its images live in KIP's space, which we rebuild from the training set.
        x_train, _ = load_dataset(dataset, "train", args.data_dir, progress=not args.no_progress)
        preprocessor = fit_preprocessor(x_train, zca=args.zca, zca_reg=args.zca_reg)
        print(f"{path} carries no preprocessing; fitted "
              f"{'standardisation + ZCA' if args.zca else 'standardisation'} on the {dataset} training set")
    return preprocessor


def _cmd_evaluate(args) -> int:
    from kernel_distill.data import load_dataset
    from kernel_distill.io import load_distilled
    from kernel_distill.krr import DEFAULT_REG, evaluate

    _check_positive("--test-limit", args.test_limit)
    distilled = load_distilled(args.file)
    preprocessor = _preprocessing_for(distilled, args.file, args.dataset, args)
    x_test, y_test = load_dataset(args.dataset, "test", args.data_dir, progress=not args.no_progress)
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    meta = distilled.metadata
    spec = _spec_from_args(args, meta.get("kernel"))
    get = args.get or meta.get("get", "ntk")
    reg = args.reg if args.reg is not None else meta.get("reg", DEFAULT_REG)
    kernel_fn = _kernel_fn(args, spec)
    start = time.perf_counter()
    result = evaluate(kernel_fn, distilled.images.astype(_dtype(args)), distilled.labels.astype(_dtype(args)),
                      preprocessor.apply(x_test).astype(_dtype(args)), y_test, reg=reg, get=get,
                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"{args.file}: {len(distilled.images)} support images, {spec.architecture} {get.upper()} "
          f"(depth {spec.depth}), reg {reg:g}: test accuracy {100 * result.accuracy:.2f}% on "
          f"{result.num_test} {args.dataset} test images ({seconds:.1f} s)")
    if args.json:
        print(json.dumps(dict(file=str(args.file), dataset=args.dataset, kernel=spec.to_dict(), get=get, reg=reg,
                              seconds=seconds, **result.to_dict())))
    return 0


def natural_subset(x_train, y_train, per_class: int, num_classes: int, seed: int):
    """A seeded class-balanced subset of raw training images. Returns ``(x uint8, y int)``."""
    import jax

    from kernel_distill.data import class_balanced_indices

    idx = class_balanced_indices(y_train, per_class, num_classes, jax.random.PRNGKey(seed))
    return x_train[idx], y_train[idx]


def _cmd_baseline(args) -> int:
    from kernel_distill.data import dataset_info, load_dataset
    from kernel_distill.io import DistilledSet, save_distilled
    from kernel_distill.krr import DEFAULT_REG, evaluate
    from kernel_distill.preprocess import centered_one_hot, fit_preprocessor

    _check_positive("--per-class", args.per_class, allow_none=False)
    _check_positive("--seeds", args.seeds, allow_none=False)
    _check_positive("--test-limit", args.test_limit)
    info = dataset_info(args.dataset)
    spec = _spec_from_args(args)
    get, reg = args.get or "ntk", args.reg if args.reg is not None else DEFAULT_REG
    x_train, y_train = load_dataset(args.dataset, "train", args.data_dir, progress=not args.no_progress)
    x_test, y_test = load_dataset(args.dataset, "test", args.data_dir, progress=not args.no_progress)
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    preprocessor = fit_preprocessor(x_train, zca=args.zca, zca_reg=args.zca_reg)
    z_test = preprocessor.apply(x_test).astype(_dtype(args))
    kernel_fn = _kernel_fn(args, spec)
    accuracies = []
    for seed in range(args.seeds):
        xs, ys = natural_subset(x_train, y_train, args.per_class, info.num_classes, seed)
        zs, labels = preprocessor.apply(xs), centered_one_hot(ys, info.num_classes)
        result = evaluate(kernel_fn, zs.astype(_dtype(args)), labels.astype(_dtype(args)), z_test, y_test, reg=reg,
                          get=get, progress=not args.no_progress, description=f"seed {seed}")
        accuracies.append(result.accuracy)
        print(f"seed {seed}: {100 * result.accuracy:.2f}%")
        if seed == 0 and args.out:
            meta = dict(dataset=args.dataset, method="natural", per_class=args.per_class, seed=seed,
                        kernel=spec.to_dict(), get=get, reg=reg, metrics=result.to_dict())
            save_distilled(args.out, DistilledSet(zs, labels, preprocessor, meta))
            print(f"saved the seed-0 subset to {args.out}")
    acc = 100 * np.asarray(accuracies)
    std = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    print(f"{args.dataset}, {args.per_class} per class, {spec.architecture} {get.upper()} depth {spec.depth}: "
          f"{acc.mean():.2f} +- {std:.2f}% over {len(acc)} seeds ({len(x_test)} test images)")
    if args.json:
        print(json.dumps(dict(dataset=args.dataset, per_class=args.per_class, kernel=spec.to_dict(), get=get,
                              reg=reg, accuracies=acc.tolist(), mean=float(acc.mean()), std=std)))
    return 0


def _cmd_demo(args) -> int:
    """KIP on scikit-learn's digits (bundled, no files): 10 learned images and labels per class."""
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.kip import KipConfig, run_kip
    from kernel_distill.preprocess import prepare_dataset

    out = pathlib.Path(args.out)
    config = KipConfig(dataset="digits", per_class=10, kernel=KernelSpec("fc"), learn_labels=True, steps=1000,
                       eval_every=100, checkpoint_every=100)
    data = prepare_dataset("digits", progress=False)
    start = time.perf_counter()
    summary = run_kip(config, data, out, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"KIP on digits (1,438 training images -> 10 per class), FC NTK, {summary['step']} steps in "
          f"{time.perf_counter() - start:.0f} s: KRR test accuracy {100 * summary['last_accuracy']:.2f}% on "
          f"{len(data.y_test)} test images")
    print(f"outputs in {out}/: distilled.npz, grid.png (the learned images), curve.png, metrics.jsonl")
    print("MNIST: KERNEL_DISTILL_DATA=DIR .venv/bin/kernel-distill kip --dataset mnist --per-class 10 "
          "--learn-labels --steps 2000 --out runs/mnist-fc-10")
    return 0


def _cmd_label_solve(args) -> int:
    import resource

    from kernel_distill import plots
    from kernel_distill.io import DistilledSet, atomic_write_text, load_distilled, save_distilled
    from kernel_distill.krr import DEFAULT_REG, evaluate
    from kernel_distill.label_solve import label_covariance, solve_labels
    from kernel_distill.preprocess import centered_one_hot, prepare_dataset

    for name in ("--train-limit", "--test-limit"):
        _check_positive(name, getattr(args, name[2:].replace("-", "_")))
    _check_positive("--block-size", args.block_size, allow_none=False)
    data = prepare_dataset(args.dataset, args.data_dir, zca=args.zca, zca_reg=args.zca_reg,
                           test_limit=args.test_limit, progress=not args.no_progress)
    spec, get = _spec_from_args(args), args.get or "ntk"
    reg = args.reg if args.reg is not None else DEFAULT_REG
    kernel_fn = _kernel_fn(args, spec)
    if args.support:
        given = load_distilled(args.support)
        if given.images.shape[1:] != data.x_train.shape[1:] or given.num_classes != data.num_classes:
            raise KernelDistillError(f"{args.support} does not match {args.dataset}: images "
                                     f"{given.images.shape[1:]}, {given.num_classes} label columns")
        x_support, original = given.images.astype(_dtype(args)), given.labels
        original = centered_one_hot(original.argmax(axis=1), data.num_classes)
    else:
        _check_positive("--support-size", args.support_size, allow_none=False)
        if args.support_size % data.num_classes:
            raise KernelDistillError(f"--support-size must be a multiple of {data.num_classes} (class-balanced)")
        raw, y = natural_subset(data.raw_train, data.y_train, args.support_size // data.num_classes,
                                data.num_classes, args.seed)
        x_support, original = data.preprocessor.apply(raw).astype(_dtype(args)), centered_one_hot(y, data.num_classes)
    x_train, y_train = data.x_train, data.y_train
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    start = time.perf_counter()
    result = solve_labels(kernel_fn, x_support, x_train.astype(_dtype(args)),
                          centered_one_hot(y_train, data.num_classes), reg=reg, ls_reg=args.ls_reg, get=get,
                          block_size=args.block_size, progress=not args.no_progress)
    solve_seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    z_test = data.x_test.astype(_dtype(args))
    natural = evaluate(kernel_fn, x_support, original, z_test, data.y_test, reg, get, progress=False)
    solved = evaluate(kernel_fn, x_support, result.labels, z_test, data.y_test, reg, get, progress=False)
    out = pathlib.Path(args.out or f"runs/ls-{args.dataset}-{len(x_support)}")
    metrics = dict(dataset=args.dataset, support_size=len(x_support), num_train=result.num_train,
                   kernel=spec.to_dict(), get=get, reg=reg, ls_reg=args.ls_reg,
                   test_accuracy_original_labels=natural.accuracy, test_accuracy_solved_labels=solved.accuracy,
                   num_test=solved.num_test, solve_seconds=solve_seconds, peak_rss_mb=peak_mb)
    meta = dict(dataset=args.dataset, method="label_solve", seed=args.seed, kernel=spec.to_dict(), get=get, reg=reg,
                ls_reg=args.ls_reg, metrics=metrics)
    save_distilled(out / "distilled.npz", DistilledSet(x_support, result.labels, data.preprocessor, meta))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plots.save_heatmap(out / "label_covariance.png", label_covariance(original, result.labels),
                       "original class (one-hot)", "solved label column", data.class_names,
                       title=f"Label Solve, {args.dataset}, support {len(x_support)}")
    print(f"Label Solve on {args.dataset}: support {len(x_support)}, {result.num_train} training images, "
          f"{spec.architecture} {get.upper()}, {solve_seconds:.1f} s, peak memory {peak_mb:.0f} MB")
    print(f"KRR test accuracy: original labels {100 * natural.accuracy:.2f}%, solved labels "
          f"{100 * solved.accuracy:.2f}% ({solved.num_test} test images)")
    print(f"outputs in {out}: distilled.npz, label_covariance.png, metrics.json")
    if args.json:
        print(json.dumps(metrics))
    return 0


def _cmd_transfer(args) -> int:
    from kernel_distill import plots
    from kernel_distill.data import dataset_info, load_dataset
    from kernel_distill.finite import TrainConfig, build_model, default_learning_rate, train_seeds
    from kernel_distill.io import atomic_write_text, load_distilled
    from kernel_distill.preprocess import centered_one_hot, fit_preprocessor

    _check_positive("--seeds", args.seeds, allow_none=False)
    for name in ("--test-limit", "--width", "--depth"):
        _check_positive(name, getattr(args, name[2:].replace("-", "_")))
    # Before any data is loaded, so that a bad training setting fails at once.
    config = TrainConfig(steps=args.steps, optimizer=args.optimizer,
                         learning_rate=default_learning_rate(args.model) if args.lr is None else args.lr,
                         weight_decay=args.weight_decay, loss=args.loss, batch_size=args.batch_size,
                         eval_every=args.eval_every)
    if (args.file is None) == (args.natural_per_class is None):
        raise KernelDistillError("give a distilled-set FILE or --natural-per-class N (not both)")
    if args.file:
        distilled = load_distilled(args.file)
        dataset = args.dataset or distilled.metadata.get("dataset")
        if not dataset:
            raise KernelDistillError(f"{args.file} does not say its dataset: add --dataset")
        info = dataset_info(dataset)
        preprocessor = _preprocessing_for(distilled, args.file, dataset, args)
        x_support, y_support, source = distilled.images, distilled.labels, str(args.file)
    else:
        if not args.dataset:
            raise KernelDistillError("--natural-per-class needs --dataset")
        _check_positive("--natural-per-class", args.natural_per_class)
        dataset, info = args.dataset, dataset_info(args.dataset)
        x_raw, y_raw = load_dataset(dataset, "train", args.data_dir, progress=not args.no_progress)
        preprocessor = fit_preprocessor(x_raw, zca=args.zca, zca_reg=args.zca_reg)
        xs, ys = natural_subset(x_raw, y_raw, args.natural_per_class, info.num_classes, args.seed)
        x_support, y_support = preprocessor.apply(xs), centered_one_hot(ys, info.num_classes)
        source = f"{args.natural_per_class} natural images per class (seed {args.seed})"
    x_test, y_test = load_dataset(dataset, "test", args.data_dir, progress=not args.no_progress)
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    z_test = preprocessor.apply(x_test)

    def model_fn():
        return build_model(args.model, info.num_classes, args.width, args.depth, args.parameterization)

    result = train_seeds(model_fn, x_support, y_support, z_test, y_test, config, range(args.seeds),
                         progress=not args.no_progress)
    seconds = sum(r["seconds"] for r in result["runs"])
    eval_seconds = sum(r["eval_seconds"] for r in result["runs"])
    print(f"{args.model} ({result['runs'][0]['num_parameters']:,} parameters) trained {args.steps} steps on "
          f"{source}: test accuracy {100 * result['mean']:.2f} +- {100 * result['std']:.2f}% over {args.seeds} "
          f"seeds on {len(y_test)} {dataset} test images ({seconds - eval_seconds:.0f} s training, "
          f"{eval_seconds:.0f} s testing)")
    metrics = dict(source=source, dataset=dataset, model=args.model, width=args.width, depth=args.depth,
                   parameterization=args.parameterization, train=dataclasses.asdict(config), mean=result["mean"],
                   std=result["std"], seconds=seconds, eval_seconds=eval_seconds,
                   runs=[dict(test_accuracy=r["test_accuracy"], curve=r["curve"], seconds=r["seconds"],
                              eval_seconds=r["eval_seconds"]) for r in result["runs"]])
    if args.out:
        out = pathlib.Path(args.out)
        atomic_write_text(out / "transfer_metrics.json", json.dumps(metrics, indent=2) + "\n")
        records = [dict(step=step, test_accuracy=acc) for step, acc in result["runs"][0]["curve"]]
        plots.save_learning_curve(out / "transfer_curve.png", records,
                                  title=f"{args.model} on {source} (seed 0)")
        print(f"outputs in {out}: transfer_metrics.json, transfer_curve.png")
    if args.json:
        print(json.dumps(metrics))
    return 0


def _kip_config_from_args(args, base=None):
    from kernel_distill.kip import KipConfig

    base = base.to_dict() if base is not None else KipConfig().to_dict()
    overrides = dict(dataset=args.dataset, per_class=args.per_class, learn_labels=args.learn_labels, init=args.init,
                     target_batch_size=args.target_batch, learning_rate=args.lr, reg=args.reg, zca=args.zca,
                     zca_reg=args.zca_reg, seed=args.seed, steps=args.steps, eval_every=args.eval_every,
                     checkpoint_every=args.checkpoint_every, get=args.get, test_limit=args.test_limit,
                     memory_budget_mb=args.memory_budget_mb)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.kernel or args.depth is not None or args.W_std is not None or args.b_std is not None:
        base["kernel"] = _spec_from_args(args, base["kernel"]).to_dict()
    return KipConfig.from_dict(base)


def _cmd_kip(args) -> int:
    from kernel_distill.kip import RUN_FILES, check_resume, load_checkpoint, run_kip
    from kernel_distill.preprocess import prepare_dataset
    from kernel_distill.runs import claim_run_folder

    _check_positive("--test-limit", args.test_limit)
    if args.resume:
        if args.out is not None:
            raise KernelDistillError(f"--out cannot be used with --resume: the run continues in {args.resume}")
        if args.overwrite:
            raise KernelDistillError("--overwrite cannot be used with --resume")
        out = args.resume
        claim = claim_run_folder(out, resume=True)
    else:
        config = _kip_config_from_args(args)
        out = args.out or f"runs/kip-{config.dataset}-{config.per_class}"
        claim = claim_run_folder(out, overwrite=args.overwrite, run_files=RUN_FILES)
    # The folder is checked, locked and (on resume) the request compared before any data is loaded.
    with claim:
        if args.resume:
            saved, _ = load_checkpoint(out)
            config = _kip_config_from_args(args, saved)
            check_resume(out, config)
        data = prepare_dataset(config.dataset, args.data_dir, zca=config.zca, zca_reg=config.zca_reg,
                               test_limit=config.test_limit, progress=not args.no_progress)
        start = time.perf_counter()
        summary = run_kip(config, data, out, resume=bool(args.resume), overwrite=args.overwrite,
                          progress=not args.no_progress)
    summary["seconds"] = time.perf_counter() - start
    print(f"KIP {config.dataset}, {config.per_class}/class, {config.kernel.architecture} {config.get.upper()}, "
          f"{summary['step']} steps in {summary['seconds']:.0f} s: test accuracy {100 * summary['last_accuracy']:.2f}% "
          f"(best {100 * summary['best_accuracy']:.2f}% at step {summary['best_step']})")
    print(f"outputs in {out}: distilled.npz, distilled_best.npz, grid.png, curve.png, metrics.jsonl, config.json, "
          f"config_history.jsonl")
    if args.json:
        print(json.dumps(summary))
    return 0


_COMMANDS = {
    "datasets": _cmd_datasets,
    "evaluate": _cmd_evaluate,
    "baseline": _cmd_baseline,
    "demo": _cmd_demo,
    "kip": _cmd_kip,
    "label-solve": _cmd_label_solve,
    "transfer": _cmd_transfer,
}


def entry_point():  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
