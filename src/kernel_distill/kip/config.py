"""What defines a KIP run: its config, the options that set each field, and the checks against the data.

:class:`KipConfig` is frozen and validated when built; :func:`check_feasible` checks it against the prepared
data (class sizes, the target batch, this machine's memory) and returns the target images drawn per class.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from kernel_distill.data import PreparedData
from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelSpec
from kernel_distill.objective import DEFAULT_REG, KIP_LOSSES


# KIP's default FC NTK depth: chosen on the validation split by benchmarks/kip_defaults.py (docs/KIP.md,
# "How the defaults were chosen"); the FC kernel's own default (``KernelSpec("fc")``) stays the KIP papers' 1.
KIP_FC_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class KipConfig:
    """Everything that defines a KIP run. Defaults follow the KIP papers unless docs/KIP.md says otherwise.

    Attributes:
      dataset: dataset name (see :mod:`kernel_distill.data`).
      per_class: support images per class.
      kernel: the infinite network (default: the FC NTK of depth :data:`KIP_FC_DEPTH`); ``get``: ``"ntk"`` or
        ``"nngp"``.
      learn_labels: also optimise the support labels.
      init: ``"real"`` (class-balanced random training images), ``"noise"`` (standard normal) or ``"file"``
        (the images and labels of the distilled set ``init_file``, to continue distilling it: a warm start).
      init_file, init_sha256: with ``init="file"``, the distilled-set file and its sha256 (checked when read).
      target_batch_size: target points per step, drawn class-balanced (rounded down to a multiple of the
        number of classes); ``None``: ``default_target_batch``, or the whole class-balanced training set if
        smaller.
      default_target_batch: the target batch ``target_batch_size=None`` asks for; ``None`` resolves it from the
        kernel when the config is built (:func:`kernel_default_target_batch`: 10,000 for the exact FC kernel,
        chosen on validation, 5,000 for the others), so a saved run keeps the default it ran with.
      learning_rate: Adam step size. reg: KRR regulariser relative to ``trace(K_ss)/n``.
      zca, zca_reg: preprocessing. seed: initial random key.
      steps: total optimisation steps. eval_every, checkpoint_every, log_every: intervals in steps.
      memory_budget_mb: bound on one tile of the kernel computation.
      test_limit: evaluate on the first ``test_limit`` test images only (``None``: all); it changes the
        reported accuracies, so it is part of the run.
      select_on: ``"validation"`` (default) or ``"test"``: the split whose accuracy picks the best support.
      val_size: validation images held out of the training split (class-balanced); ``None``: the dataset's
        default (:func:`kernel_distill.data.default_val_size`) when selecting on validation, else 0.

    A resumed run may change only the fields in :data:`RESUMABLE_FIELDS`; every other field, including
    any added later, is compared with the saved config (:func:`kernel_distill.runs.resume_changes`).
      float64: run the whole step (kernels, Cholesky, Adam state, support) in float64; float32 otherwise.
      rf_fixed_networks: with a random-feature kernel (``kernel.random_features``), use its fixed evaluation
        networks in every step; by default each step draws fresh networks from the run's key (RFAD).
      loss: ``"mse"`` (KIP's mean squared error, default) or ``"platt"`` (RFAD's Platt-scaled cross-entropy,
        with a log scale learned beside the support from 0; local backend only).
    """

    dataset: str = "digits"
    per_class: int = 10
    kernel: KernelSpec = KernelSpec("fc", depth=KIP_FC_DEPTH)
    get: str = "ntk"
    learn_labels: bool = False
    init: str = "real"
    init_file: str | None = None
    init_sha256: str | None = None
    target_batch_size: int | None = None
    default_target_batch: int | None = None
    learning_rate: float = 0.01
    reg: float = DEFAULT_REG
    zca: bool = False
    zca_reg: float = 0.1
    seed: int = 0
    steps: int = 1000
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    memory_budget_mb: float = 512.0
    test_limit: int | None = None
    select_on: str = "validation"
    val_size: int | None = None
    float64: bool = False
    rf_fixed_networks: bool = False
    loss: str = "mse"

    def __post_init__(self):
        if isinstance(self.kernel, dict):
            object.__setattr__(self, "kernel", KernelSpec.from_dict(self.kernel))
        if not isinstance(self.kernel, KernelSpec):
            raise KernelDistillError(f"kernel must be a KernelSpec or its dict, got {self.kernel!r}")
        if self.default_target_batch is None:
            object.__setattr__(self, "default_target_batch", kernel_default_target_batch(self.kernel))
        for name in ("dataset", "get", "init", "loss"):
            if not isinstance(getattr(self, name), str):
                raise KernelDistillError(f"{config_flag(name)} must be a string, got {getattr(self, name)!r}")
        for name in ("learn_labels", "zca", "rf_fixed_networks"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise KernelDistillError(f"{config_flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("learning_rate", "reg", "zca_reg", "memory_budget_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise KernelDistillError(f"{config_flag(name)} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise KernelDistillError(f"--seed must be an integer, got {self.seed!r}")
        if self.test_limit is not None and (isinstance(self.test_limit, bool) or
                                            not isinstance(self.test_limit, (int, np.integer)) or self.test_limit < 1):
            raise KernelDistillError(f"--test-limit must be a positive integer, got {self.test_limit!r}")
        if not self.zca_reg > 0:
            raise KernelDistillError(f"--zca-reg must be positive, got {self.zca_reg}")
        positive = dict(per_class=self.per_class, steps=self.steps,
                        eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
                        log_every=self.log_every)
        if self.target_batch_size is not None:  # None: the default, capped by the smallest class
            positive["target_batch_size"] = self.target_batch_size
        positive["default_target_batch"] = self.default_target_batch
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise KernelDistillError(f"{config_flag(name)} must be a positive integer, got {value!r}")
        if self.init not in ("real", "noise", "file"):
            raise KernelDistillError(f"init must be 'real', 'noise' or 'file', got {self.init!r}")
        if (self.init == "file") != (self.init_file is not None):
            raise KernelDistillError("init 'file' needs init_file (the distilled set to start from), and init_file "
                                     "needs init 'file'")
        for name in ("init_file", "init_sha256"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise KernelDistillError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.loss not in KIP_LOSSES:
            raise KernelDistillError(f"--loss must be one of {', '.join(KIP_LOSSES)}, got {self.loss!r}")
        if self.get not in ("ntk", "nngp"):
            raise KernelDistillError(f"--get must be 'ntk' or 'nngp', got {self.get!r}")
        if self.kernel.random_features is not None and self.get != "nngp":
            raise KernelDistillError(f"the {self.kernel.name} kernel approximates the NNGP only: use --get nngp")
        if self.rf_fixed_networks and self.kernel.random_features is None:
            raise KernelDistillError("--rf-fixed-networks needs a random-feature kernel (e.g. --kernel convnet-rf)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise KernelDistillError(f"--lr must be positive, got {self.learning_rate}")
        if not (self.reg >= 0 and math.isfinite(self.reg)):
            raise KernelDistillError(f"--reg must be non-negative, got {self.reg}")
        if not isinstance(self.float64, (bool, np.bool_)):
            raise KernelDistillError(f"float64 must be true or false, got {self.float64!r}")
        if self.memory_budget_mb <= 0:
            raise KernelDistillError(f"--memory-budget-mb must be positive, got {self.memory_budget_mb}")
        if self.select_on not in ("validation", "test"):
            raise KernelDistillError(f"--select-on must be 'validation' or 'test', got {self.select_on!r}")
        if self.val_size is not None and (not isinstance(self.val_size, (int, np.integer)) or self.val_size < 0):
            raise KernelDistillError(f"--val-size must be a non-negative integer, got {self.val_size!r}")
        if self.select_on == "validation" and self.val_size == 0:
            raise KernelDistillError("selecting on the validation set needs --val-size above 0 (or --select-on test)")

    @property
    def effective_val_size(self) -> int:
        """The number of validation images this run holds out."""
        from kernel_distill.data import default_val_size

        if self.val_size is not None:
            return int(self.val_size)
        return default_val_size(self.dataset) if self.select_on == "validation" else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kernel"] = self.kernel.to_dict()
        return d

    @property
    def dtype(self) -> type[np.floating]:
        return np.float64 if self.float64 else np.float32

    @classmethod
    def from_dict(cls, d: dict) -> "KipConfig":
        """The inverse of :meth:`to_dict`; an unknown key or a value of the wrong type is an error."""
        if not isinstance(d, dict):
            raise KernelDistillError(f"a KIP config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if "select_on" not in d:  # written before validation splits existed: those runs selected on test
            d = dict(d, select_on="test", val_size=0)
        if "default_target_batch" not in d:  # written before 2026-12-07, when every kernel's default was 5,000
            d = dict(d, default_target_batch=DEFAULT_TARGET_BATCH)
        unknown = sorted(set(d) - known)
        if unknown:
            raise KernelDistillError(f"unknown KIP config field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, KernelDistillError):
                raise
            raise KernelDistillError(f"invalid KIP config: {e}") from None


# Fields a resumed run may change: the step total, the intervals, and the memory bound of a kernel tile (a
# resource limit: it changes how the kernel is tiled, not what it computes). Each change is recorded.
RESUMABLE_FIELDS = frozenset({"steps", "eval_every", "checkpoint_every", "log_every", "memory_budget_mb"})

# The command-line option that sets each config field (``--`` + the field name otherwise).
CONFIG_FLAGS = {"target_batch_size": "--target-batch", "default_target_batch": "--target-batch", "learning_rate": "--lr", "kernel.architecture": "--kernel",
                "kernel.depth": "--depth", "kernel.W_std": "--W-std", "kernel.b_std": "--b-std",
                "kernel.parameterization": "--kernel", "kernel.random_features": "--kernel",
                "kernel.random_features.models": "--rf-models", "kernel.random_features.width": "--rf-width",
                "kernel.random_features.seed": "--rf-seed", "kernel.random_features.norm": "--rf-norm",
                "init_file": "--init-from",
                "init_sha256": "--init-from"}


def config_flag(name: str) -> str:
    """The command-line option of a (flattened, ``kernel.depth``) config field."""
    return CONFIG_FLAGS.get(name, "--" + name.split(".")[-1].replace("_", "-"))


DEFAULT_TARGET_BATCH = 5000
# The exact FC kernel's default target batch, chosen on validation with its depth (docs/KIP.md, "How the
# defaults were chosen"); a step costs about twice that of 5,000. The conv kernels, whose pairs cost
# O(pixels^2), keep 5,000.
DEFAULT_FC_TARGET_BATCH = 10_000


def kernel_default_target_batch(kernel: KernelSpec) -> int:
    """The target batch a KIP run with this kernel draws when none is given (before the class cap)."""
    return DEFAULT_FC_TARGET_BATCH if kernel.architecture == "fc" and kernel.random_features is None \
        else DEFAULT_TARGET_BATCH


def prepare_for(config: KipConfig, data_dir: str | os.PathLike | None = None, progress: bool = True) -> PreparedData:
    """Load and preprocess ``config.dataset`` with the validation split and test limit ``config`` asks for."""
    from kernel_distill.data import prepare_dataset

    return prepare_dataset(config.dataset, data_dir, zca=config.zca, zca_reg=config.zca_reg,
                           test_limit=config.test_limit, progress=progress, val_size=config.effective_val_size)


def available_memory_bytes() -> int:
    """Physical memory of this machine (the bound a step's arrays must fit in)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_feasible(config: KipConfig, data: PreparedData, available_bytes: int | None = None) -> int:
    """Validate the run against the data; returns the target images drawn per class each step.

    ``available_bytes``: the memory a step must fit in (default :func:`available_memory_bytes`)."""
    if data.num_val != config.effective_val_size:
        raise KernelDistillError(f"the run holds out {config.effective_val_size} validation images, the prepared "
                                 f"data has {data.num_val}: prepare it with kip.prepare_for(config)")
    counts = np.bincount(data.y_train, minlength=data.num_classes)
    if config.per_class > counts.min():
        raise KernelDistillError(f"--per-class {config.per_class} is larger than the smallest class of "
                                 f"{data.name} ({counts.min()} training images)")
    if config.target_batch_size is None:
        default = config.default_target_batch  # resolved when the config was built; the fallback is for mypy
        default = kernel_default_target_batch(config.kernel) if default is None else default
        per_class_target = min(default // data.num_classes, int(counts.min()))
    else:
        per_class_target = config.target_batch_size // data.num_classes
        if per_class_target < 1:
            raise KernelDistillError(f"the target batch ({config.target_batch_size}) must hold at least one image "
                                     f"per class ({data.num_classes} classes)")
        if per_class_target > counts.min():
            raise KernelDistillError(
                f"a class-balanced target batch of {config.target_batch_size} needs {per_class_target} images per "
                f"class; the smallest class of {data.name} has {counts.min()}: use --target-batch "
                f"{counts.min() * data.num_classes} or less")
    n_support = config.per_class * data.num_classes
    n_target = per_class_target * data.num_classes
    # Memory of one step: kernel tiles are bounded, but K_ts and its gradient, the target batch and the
    # training set on the device are not.
    needed = 4 * (8 * n_target * n_support + 3 * n_target * data.x_train[0].size + data.x_train.size)
    if config.kernel.is_conv:
        needed += int(config.memory_budget_mb * 2**20) * 3
    available = available_memory_bytes() if available_bytes is None else available_bytes
    if needed > 0.8 * available:
        raise KernelDistillError(
            f"a target batch of {n_target} with {n_support} support images needs about {needed / 2**30:.1f} GiB "
            f"per step, more than this machine's {available / 2**30:.1f} GiB: lower --target-batch")
    return per_class_target

