"""``kernel-distill label-solve``: the optimal labels of a support over a training set (Label Solve), with a
checkpointed pass that ``--resume`` continues exactly.

A run folder holds ``label_solve_config.json`` (the solve's settings, written before any kernel is computed)
and, after every ``--checkpoint-every`` blocks of training images, ``label_solve_checkpoint.npz``: the running
float64 sums ``K_st K_ts`` and ``K_st y_t``, the rows they cover, the support and the data's checksums.
``--resume RUN`` reloads both, refuses any option that would change the result (the same strict rule as
``kip --resume``), checks that the support and the data are the ones summed so far, and continues after the
last checkpoint: the labels are bit-for-bit those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import TYPE_CHECKING, Any

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (DEFAULT_ZCA_REG, Compute, KernelChoice, Log, OnRecord, Preprocessing,
                                             argv, check_positive, default_get, distilled_path, kernel_function,
                                             kernel_spec, refuse_preprocessing_options, regulariser, write_record)

if TYPE_CHECKING:
    import numpy as np

    from kernel_distill.io import DistilledSet
    from kernel_distill.label_solve import NormalEquations

CONFIG = "label_solve_config.json"
CHECKPOINT = "label_solve_checkpoint.npz"
DEFAULT_SUPPORT_SIZE = 100
DEFAULT_BLOCK_SIZE = 5000
DEFAULT_CHECKPOINT_EVERY = 1  # blocks: a checkpoint costs one (n, n) float64 write, a block minutes of kernels
DEFAULT_LS_REG = 1e-6
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class LabelSolveRequest:
    """Solve the labels of a support over ``dataset``'s training set and score them on its test set.

    The support is ``support`` (a distilled-set file's images, or ``zoo:NAME``) or a seeded class-balanced
    natural sample of ``support_size`` images. ``out`` (default ``runs/ls-DATASET-SIZE``) receives
    ``distilled.npz``, ``label_covariance.png`` and ``results.json``. Every ``None`` means "the default" for a
    new run and "as saved" for a resumed one (``resume``: the run folder to continue; nothing that changes the
    result may change then)."""

    dataset: str | None = None
    support_size: int | None = None
    support: str | None = None
    seed: int | None = None  # None: 0 for a natural support; must stay None with ``support``
    train_limit: int | None = None
    test_limit: int | None = None
    val_size: int | None = None
    block_size: int | None = None
    checkpoint_every: int | None = None  # blocks of training images between checkpoints
    ls_reg: float | None = None
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None
    kernel: KernelChoice = dataclasses.field(default_factory=KernelChoice)
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    compute: Compute = dataclasses.field(default_factory=Compute)
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LabelSolveConfig:
    """What a Label Solve computes, resolved from a request: saved as ``label_solve_config.json`` and compared
    field by field on ``--resume``. ``support_file``/``support_sha256`` name a support file (then
    ``support_size`` and ``seed`` are None), else ``support_size`` natural images drawn with ``seed``."""

    dataset: str
    support_size: int | None
    support_file: str | None
    support_sha256: str | None
    seed: int | None
    train_limit: int | None
    test_limit: int | None
    val_size: int
    block_size: int
    checkpoint_every: int
    ls_reg: float
    kernel: dict[str, Any]
    get: str
    reg: float
    zca: bool
    zca_reg: float
    float64: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabelSolveConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            missing = sorted(names - set(values)) if isinstance(values, dict) else sorted(names)
            extra = sorted(set(values) - names) if isinstance(values, dict) else []
            raise KernelDistillError(f"not a label-solve config (missing {missing}, unknown {extra})")
        return cls(**values)


# The option that sets each config field, for resume errors (``--`` + the field name otherwise).
_FLAGS = {"support_file": "--support", "support_sha256": "--support", "kernel.architecture": "--kernel",
          "kernel.random_features": "--kernel", "kernel.parameterization": "--kernel", "kernel.depth": "--depth",
          "kernel.W_std": "--W-std", "kernel.b_std": "--b-std", "kernel.random_features.models": "--rf-models",
          "kernel.random_features.width": "--rf-width", "kernel.random_features.seed": "--rf-seed",
          "kernel.random_features.norm": "--rf-norm"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("label-solve", help="solve the optimal labels of a natural support over the training set")
    p.add_argument("--dataset", default=None, help="dataset whose training set the labels are solved over")
    p.add_argument("--support-size", type=int, default=None,
                   help=f"class-balanced natural support size (a multiple of the number of classes; default "
                        f"{DEFAULT_SUPPORT_SIZE})")
    p.add_argument("--support", default=None,
                   help="use the images of this distilled-set .npz (or zoo:NAME) as the support")
    p.add_argument("--seed", type=int, default=None, help="seed of the natural support sample (default 0)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--val-size", type=int, default=None,
                   help="class-balanced validation images held out of the training split: never support, never "
                        "targets (the split kip and transfer --val-size hold out; default 0)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"training images per kernel block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"blocks between checkpoints of the running sums (default {DEFAULT_CHECKPOINT_EVERY})")
    p.add_argument("--ls-reg", type=arguments.NON_NEGATIVE, default=None,
                   help=f"ridge on K_st K_ts, relative to its trace / n (default {DEFAULT_LS_REG:g})")
    p.add_argument("--out", default=None, help="output folder, new or empty (default runs/ls-DATASET-SIZE)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the interrupted solve saved in DIR after its last checkpoint (nothing that "
                        "changes the result may change)")
    arguments.add_overwrite(p)
    arguments.add_kernel(p, default_kernel=None)
    arguments.add_preprocess(p)
    arguments.add_common(p)


def request_from_args(args: argparse.Namespace) -> LabelSolveRequest:
    return LabelSolveRequest(dataset=args.dataset, support_size=args.support_size, support=args.support,
                             seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit,
                             val_size=args.val_size, block_size=args.block_size, checkpoint_every=args.checkpoint_every,
                             ls_reg=args.ls_reg, out=args.out, overwrite=args.overwrite, resume=args.resume,
                             kernel=arguments.kernel_choice(args), preprocessing=arguments.preprocessing(args),
                             compute=arguments.compute(args), data_dir=args.data_dir, progress=not args.no_progress,
                             command_line=arguments.command_line(args))


def label_solve_config(request: LabelSolveRequest, base: LabelSolveConfig | None = None) -> LabelSolveConfig:
    """The config ``request`` asks for: its options over ``base`` (a resumed run's saved config), else over
    the defaults. Checks counts; resolves and hashes a support file."""
    from kernel_distill.checksums import file_sha256

    if request.val_size is not None and request.val_size < 0:
        raise KernelDistillError(f"--val-size must be 0 or more, got {request.val_size}")
    for name, value in (("--train-limit", request.train_limit), ("--test-limit", request.test_limit),
                        ("--support-size", request.support_size), ("--block-size", request.block_size),
                        ("--checkpoint-every", request.checkpoint_every)):
        check_positive(name, value)
    values: dict[str, Any] = base.to_dict() if base is not None else dict(
        dataset=None, support_size=DEFAULT_SUPPORT_SIZE, support_file=None, support_sha256=None, seed=DEFAULT_SEED,
        train_limit=None, test_limit=None, val_size=0, block_size=DEFAULT_BLOCK_SIZE,
        checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
        ls_reg=DEFAULT_LS_REG, kernel=None, get=None, reg=None, zca=False, zca_reg=DEFAULT_ZCA_REG, float64=False)
    pre = request.preprocessing
    overrides = dict(dataset=request.dataset, support_size=request.support_size, seed=request.seed,
                     train_limit=request.train_limit, test_limit=request.test_limit, val_size=request.val_size,
                     block_size=request.block_size,
                     checkpoint_every=request.checkpoint_every, ls_reg=request.ls_reg, zca=True if pre.zca else None,
                     zca_reg=pre.zca_reg, float64=True if request.compute.float64 else None, reg=request.kernel.reg,
                     get=request.kernel.get)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if request.support is not None:
        if request.seed is not None:
            raise KernelDistillError(f"--seed draws a natural support; with --support the images are "
                                     f"{request.support}'s: drop --seed")
        if request.support_size is not None:
            raise KernelDistillError(f"--support-size draws a natural support; with --support the size is "
                                     f"{request.support}'s: drop --support-size")
        path = pathlib.Path(distilled_path(request.support, request.data_dir, request.progress)).resolve()
        if not path.is_file():
            raise KernelDistillError(f"--support: {request.support}: no such file")
        values.update(support_file=str(path), support_sha256=file_sha256(path), support_size=None, seed=None)
    if base is None or request.kernel.names_an_architecture():
        spec = kernel_spec(request.kernel, values["kernel"])
        values["kernel"] = spec.to_dict()
        if request.kernel.get is None and (base is None or values["get"] is None):
            values["get"] = default_get(request.kernel, spec)
    if values["reg"] is None:
        values["reg"] = regulariser(request.kernel)
    if not values["dataset"]:
        raise KernelDistillError("--dataset is required (or --resume DIR to continue a run)")
    return LabelSolveConfig.from_dict(values)


def run(request: LabelSolveRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request (and the support file), own (or reopen, to resume) the output folder, solve; returns
    the result record."""
    from kernel_distill.runs import OUTPUT_FILES, claim_run_folder, resume_changes

    request.compute.backend_options()
    request.compute.enable_precision()
    if request.resume is not None:
        if request.out is not None:
            raise KernelDistillError(f"--out cannot be used with --resume: the run continues in {request.resume}")
        if request.overwrite:
            raise KernelDistillError("--overwrite cannot be used with --resume")
        out = request.resume
        claim = claim_run_folder(out, resume=True)
    else:
        config = label_solve_config(request)
        given = _load_support(config, request)  # a bad support file is refused before the folder is touched
        size = len(given.images) if given is not None else config.support_size
        out = request.out if request.out is not None else f"runs/ls-{config.dataset}-{size}"
        claim = claim_run_folder(out, overwrite=request.overwrite, run_files=OUTPUT_FILES["label-solve"],
                                 command="label-solve")
    with claim as folder:  # checked and locked (and a resume compared) before any data is loaded
        start: NormalEquations | None = None
        saved_support = None
        if request.resume is not None:
            saved = read_config(folder)
            config = label_solve_config(request, saved)
            resume_changes(saved.to_dict(), config.to_dict(), frozenset(), _flag)
            given = _load_support(config, request)
            if (folder / "results.json").is_file():
                raise KernelDistillError(f"the label solve in {folder} has finished (results.json): nothing to "
                                         f"resume")
            start, saved_support = read_checkpoint(folder)
        record = _label_solve(request, config, given, folder, start, saved_support, log)
        write_record(folder, record, on_record)
    log(f"outputs in {folder}: distilled.npz, label_covariance.png, results.json")
    return record


def read_config(folder: pathlib.Path) -> LabelSolveConfig:
    """The saved config of a label-solve run folder, with a clear error when there is none."""
    path = folder / CONFIG
    if not path.is_file():
        raise KernelDistillError(f"cannot resume: {folder} has no {CONFIG} (not a label-solve run folder)")
    try:
        return LabelSolveConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, OSError, TypeError) as e:
        raise KernelDistillError(f"cannot resume from {folder}: {CONFIG} is unreadable ({e})") from None
    except KernelDistillError as e:
        raise KernelDistillError(f"cannot resume from {folder}: {CONFIG}: {e}") from None


def save_checkpoint(folder: pathlib.Path, sums: NormalEquations, num_train: int, support: np.ndarray,
                    original_labels: np.ndarray, checksums: dict[str, str]) -> None:
    import numpy as np

    from kernel_distill.atomic import atomic_savez

    atomic_savez(folder / CHECKPOINT, gram=sums.gram, projected=sums.projected, count=np.int64(sums.count),
                 num_train=np.int64(num_train), support=np.asarray(support), original_labels=original_labels,
                 checksums=np.array(json.dumps(checksums, sort_keys=True)))


def read_checkpoint(folder: pathlib.Path) -> tuple[NormalEquations | None, dict | None]:
    """The running sums and what they were summed with (support, labels, data checksums, rows in all), or
    ``(None, None)`` when the run stopped before its first checkpoint (it then starts from the first block)."""
    import numpy as np

    from kernel_distill.label_solve import NormalEquations

    path = folder / CHECKPOINT
    if not path.is_file():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as f:
            sums = NormalEquations(np.array(f["gram"], np.float64), np.array(f["projected"], np.float64),
                                   int(f["count"]))
            saved = dict(support=np.array(f["support"]), original_labels=np.array(f["original_labels"]),
                         checksums=json.loads(str(f["checksums"])), num_train=int(f["num_train"]))
    except Exception as e:  # a truncated zip, a missing key: the checkpoint is unusable
        raise KernelDistillError(f"cannot resume from {folder}: unreadable {CHECKPOINT} "
                                 f"({type(e).__name__}: {e})") from None
    return sums, saved


def _load_support(config: LabelSolveConfig, request: LabelSolveRequest) -> DistilledSet | None:
    """The support file's set (checked against the dataset and the options), or None for a natural support;
    refuses a training limit below the support's size."""
    from kernel_distill.checksums import file_sha256
    from kernel_distill.io import check_preprocessing_request, dataset_of, load_distilled

    given = None
    if config.support_file is not None:
        given = load_distilled(config.support_file, request.data_dir, request.progress)
        if file_sha256(config.support_file) != config.support_sha256:
            raise KernelDistillError(f"the support file {config.support_file} has changed since the run started")
        dataset_of(given, config.support_file, config.dataset)
        check_preprocessing_request(given, config.support_file, config.zca)
        refuse_preprocessing_options(request.preprocessing, given, config.support_file)
    support_size = len(given.images) if given is not None else config.support_size
    if config.train_limit is not None and support_size is not None and config.train_limit < support_size:
        raise KernelDistillError(f"--train-limit {config.train_limit} gives fewer training targets than the "
                                 f"{support_size} support images: their labels would be underdetermined; use "
                                 f"--train-limit {support_size} or more")
    return given


def _check_same_inputs(folder: pathlib.Path, saved: dict, support, original_labels, checksums: dict[str, str],
                       num_train: int) -> None:
    import numpy as np

    problems = []
    if saved["checksums"] != checksums:
        problems.append(f"the dataset's files differ ({saved['checksums']} then, {checksums} now)")
    if saved["num_train"] != num_train:
        problems.append(f"{saved['num_train']} training images then, {num_train} now")
    if saved["support"].shape != np.shape(support) or not np.array_equal(saved["support"], support):
        problems.append("the support images differ")
    elif not np.array_equal(saved["original_labels"], original_labels):
        problems.append("the support's labels differ")
    if problems:
        raise KernelDistillError(f"cannot resume from {folder}: {problems[0]}; the saved sums would be mixed with "
                                 f"others (start a new run)")


def _label_solve(request: LabelSolveRequest, config: LabelSolveConfig, given: DistilledSet | None, out: pathlib.Path,
                 start: NormalEquations | None, saved: dict | None, log: Log) -> dict:
    import numpy as np

    from kernel_distill import experiments, plots
    from kernel_distill.data import prepare_dataset
    from kernel_distill.io import DistilledSet, save_distilled
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.preprocess import centered_one_hot
    from kernel_distill.results import dataset_record, make_record
    from kernel_distill.runs import append_history

    begin = time.perf_counter()
    dtype = np.float64 if config.float64 else np.float32
    # A support file's own preprocessing maps the training and test images into its space.
    data = prepare_dataset(config.dataset, request.data_dir, zca=config.zca, zca_reg=config.zca_reg,
                           test_limit=config.test_limit, progress=request.progress, val_size=config.val_size,
                           preprocessor=given.preprocessor if given is not None else None)
    spec = KernelSpec.from_dict(config.kernel)
    kernel_fn = kernel_function(request.compute, spec)
    if given is not None:
        if given.images.shape[1:] != data.x_train.shape[1:] or given.num_classes != data.num_classes:
            raise KernelDistillError(f"{config.support_file} does not match {config.dataset}: images "
                                     f"{given.images.shape[1:]}, {given.num_classes} label columns")
        x_support = given.images.astype(dtype)
        original = centered_one_hot(given.labels.argmax(axis=1), data.num_classes)
    else:
        assert config.seed is not None and config.support_size is not None
        x_support, original = experiments.natural_support(data, config.support_size, config.seed, dtype)
    num_train = len(data.x_train) if config.train_limit is None else min(config.train_limit, len(data.x_train))
    if saved is not None:
        _check_same_inputs(out, saved, x_support, original, data.checksums, num_train)
    rows_done = 0 if start is None else start.count
    if request.resume is None:  # written once the inputs are known good, before the first kernel block
        from kernel_distill.atomic import atomic_write_text

        atomic_write_text(out / CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
    append_history(out, "resume" if request.resume is not None else "start", step=rows_done,
                   backend=request.compute.backend, **({} if request.resume is not None else
                                                       dict(config=config.to_dict())))
    if rows_done:
        log(f"resuming {out}: {rows_done} of {num_train} training images summed at the last checkpoint")

    def checkpoint(sums: NormalEquations) -> None:
        save_checkpoint(out, sums, num_train, x_support, original, data.checksums)

    try:
        with request.compute.open_backend() as backend:
            result = experiments.label_solve_on(
                data, kernel_fn, x_support, original, config.reg, config.ls_reg, config.get, config.train_limit,
                config.block_size, dtype, request.progress, backend=backend, chunk_blocks=config.checkpoint_every,
                start=start, on_chunk=checkpoint)
    except KeyboardInterrupt:
        log(f"interrupted: the sums of the last checkpoint are in {out / CHECKPOINT}; continue with --resume {out}")
        raise
    metrics = result["metrics"]
    meta = dict(dataset=config.dataset, method="label_solve", seed=config.seed, kernel=config.kernel,
                get=config.get, reg=config.reg, ls_reg=config.ls_reg, metrics=metrics)
    save_distilled(out / "distilled.npz", DistilledSet(x_support, result["labels"], data.preprocessor, meta))
    plots.save_figure(out / "label_covariance.png", plots.heatmap_figure(
        result["covariance"], "original class (one-hot)", "solved label column", data.class_names,
        title=f"Label Solve, {config.dataset}, support {len(x_support)}"))
    log(f"Label Solve on {config.dataset}: support {len(x_support)}, {metrics['num_train']} training images, "
        f"{spec.description} {config.get.upper()}, {metrics['solve_seconds']:.1f} s this session, peak memory "
        f"{metrics['peak_rss_mb']:.0f} MB")
    log(f"KRR test accuracy: original labels {100 * metrics['test_accuracy_original_labels']:.2f}%, solved labels "
        f"{100 * metrics['test_accuracy']:.2f}% ({metrics['num_test']} test images)")
    record_config = dict(config.to_dict(), support=request.support or config.support_file,
                         support_size=len(x_support), resumed_from_rows=rows_done)
    return make_record("label-solve", "label_solve",
                       dataset_record(config.dataset, data.checksums, num_train=metrics["num_train"],
                                      num_test=metrics["num_test"]),
                       metrics, record_config, curves=dict(label_covariance=result["covariance"]),
                       artifacts=dict(distilled="distilled.npz", label_covariance="label_covariance.png"),
                       dtype=dtype.__name__, wall_seconds=time.perf_counter() - begin,
                       argv=argv(request.command_line))
