"""KIP (Kernel Inducing Points): learn a small support set by gradient descent through the KRR loss.

Each step draws a fresh class-balanced target batch ``(X_t, y_t)`` from the whole training set and takes
one Adam step on the support images (and, with ``learn_labels``, the support labels) against

    loss = 0.5 * mean((K_ts (K_ss + reg * tr(K_ss)/n I)^-1 y_s - y_t)^2)

(Nguyen, Chen & Lee, ICLR 2021; Nguyen, Novak, Xiao & Lee, NeurIPS 2021), or with ``loss="platt"`` RFAD's
cross-entropy of the predictions scaled by a learned ``exp(log_scale)`` (Loo et al., NeurIPS 2022; see
:func:`kernel_distill.krr.krr_platt_loss`). The target batches come from
the training split *minus* a class-balanced validation set. Every ``eval_every`` steps the support is
scored by KRR on the validation set and on the test set; the support with the best *validation* accuracy
is kept beside the last one (``select_on="test"`` selects on the test set instead, as the KIP papers did:
only for reproducing them, and it is written in the outputs). Every
``checkpoint_every`` steps, and on Ctrl-C, the complete state (support, labels, optimiser state, random
key, step, best support) is written atomically, so ``resume`` continues exactly where the run stopped:
the random key chain and the optimiser state make a resumed run step-for-step identical to an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernel_distill import runs
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import DistilledSet, atomic_savez, atomic_write_text, save_distilled
from kernel_distill import kernels
from kernel_distill.kernels import KernelFn, KernelSpec, make_kernel_fn
from kernel_distill.kernels import random_features as rf
from kernel_distill.krr import DEFAULT_REG, KIP_LOSSES, evaluate, kip_loss
from kernel_distill.data import PreparedData
from kernel_distill.distributed import LocalBackend
from kernel_distill.preprocess import centered_one_hot

CHECKPOINT = "checkpoint.npz"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class KipConfig:
    """Everything that defines a KIP run. Defaults follow the KIP papers unless docs/KIP.md says otherwise.

    Attributes:
      dataset: dataset name (see :mod:`kernel_distill.data`).
      per_class: support images per class.
      kernel: the infinite network; ``get``: ``"ntk"`` or ``"nngp"``.
      learn_labels: also optimise the support labels.
      init: ``"real"`` (class-balanced random training images), ``"noise"`` (standard normal) or ``"file"``
        (the images and labels of the distilled set ``init_file``, to continue distilling it: a warm start).
      init_file, init_sha256: with ``init="file"``, the distilled-set file and its sha256 (checked when read).
      target_batch_size: target points per step, drawn class-balanced (rounded down to a multiple of the
        number of classes); ``None``: 5,000, or the whole class-balanced training set if smaller.
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
    kernel: KernelSpec = KernelSpec()
    get: str = "ntk"
    learn_labels: bool = False
    init: str = "real"
    init_file: str | None = None
    init_sha256: str | None = None
    target_batch_size: int | None = None
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
    def dtype(self):
        return np.float64 if self.float64 else np.float32

    @classmethod
    def from_dict(cls, d: dict) -> "KipConfig":
        """The inverse of :meth:`to_dict`; an unknown key or a value of the wrong type is an error."""
        if not isinstance(d, dict):
            raise KernelDistillError(f"a KIP config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if "select_on" not in d:  # written before validation splits existed: those runs selected on test
            d = dict(d, select_on="test", val_size=0)
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
CONFIG_FLAGS = {"target_batch_size": "--target-batch", "learning_rate": "--lr", "kernel.architecture": "--kernel",
                "kernel.depth": "--depth", "kernel.W_std": "--W-std", "kernel.b_std": "--b-std",
                "kernel.parameterization": "--kernel", "kernel.random_features": "--kernel",
                "kernel.random_features.models": "--rf-models", "kernel.random_features.width": "--rf-width",
                "kernel.random_features.seed": "--rf-seed", "kernel.random_features.norm": "--rf-norm",
                "init_file": "--init-from",
                "init_sha256": "--init-from"}


def config_flag(name: str) -> str:
    """The command-line option of a (flattened, ``kernel.depth``) config field."""
    return CONFIG_FLAGS.get(name, "--" + name.split(".")[-1].replace("_", "-"))


@dataclasses.dataclass
class KipState:
    """The resumable state of a run (host numpy arrays)."""

    step: int
    images: np.ndarray  # float32 or float64 (the run's dtype) (n, H, W, C)
    labels: np.ndarray  # same dtype (n, num_classes)
    opt_leaves: list  # optax state leaves
    key: np.ndarray  # uint32 (2,)
    best_images: np.ndarray
    best_labels: np.ndarray
    best_accuracy: float = -1.0  # on the selection split (validation, or test with select_on="test")
    best_step: int = -1
    last_accuracy: float | None = None  # test accuracy of the current support
    best_test_accuracy: float | None = None  # test accuracy of the best support
    last_val_accuracy: float | None = None
    log_scale: float = 0.0  # the Platt scale's logarithm (loss="platt"; stays 0 otherwise)


# ----------------------------------------------------------------------------------------------------
# Pure pieces.


def class_index_table(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of each class, padded: ``(num_classes, max_count)`` int32 and counts ``(num_classes,)``."""
    groups = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = np.array([len(g) for g in groups], np.int32)
    table = np.zeros((num_classes, max(counts.max(), 1)), np.int32)
    for c, g in enumerate(groups):
        table[c, :len(g)] = g
    return table, counts


def sample_balanced(key, table, counts, per_class: int):
    """``per_class`` distinct indices of every class, drawn with ``key``. Returns int ``(C * per_class,)``."""
    max_count = table.shape[1]

    def one_class(k, row, count):
        weights = (jnp.arange(max_count) < count).astype(jnp.float32)
        picks = jax.random.choice(k, max_count, (per_class,), replace=False, p=weights / count)
        return row[picks]

    keys = jax.random.split(key, table.shape[0])
    return jax.vmap(one_class)(keys, table, counts).reshape(-1)


def make_optimizer(config: KipConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


def _params(images, labels, learn_labels: bool, log_scale=None) -> dict:
    """The optimised arrays: images, labels with ``learn_labels``, the Platt log scale unless ``None``."""
    params = {"images": images, "labels": labels} if learn_labels else {"images": images}
    if log_scale is not None:
        params["log_scale"] = log_scale
    return params


def _state_params(state: "KipState", config: KipConfig) -> dict:
    log_scale = jnp.asarray(state.log_scale, config.dtype) if config.loss == "platt" else None
    return _params(jnp.asarray(state.images), jnp.asarray(state.labels), config.learn_labels, log_scale)


def krr_loss_and_gradients(kernel_fn: KernelFn, get: str, reg: float, x_s, y_s, x_t, y_t, log_scale=None):
    """The KRR loss of a support on a target batch, and its gradients, through the kernel block API.

    Kernel blocks forward (``K_ss``, ``K_ts``), ``jax.vjp`` of the KRR loss for ``dL/dK_ss``,
    ``dL/dK_ts`` and ``dL/dy_s``, block VJPs backward, gradients summed: the same numbers as ``jax.grad``
    of the whole loss (tested to 1e-10 in float64), in the order a distributed backend computes them.

    Args:
      x_s: ``(n, ...)`` support images; y_s: ``(n, C)`` support labels; x_t: ``(m, ...)``, y_t: ``(m, C)``.
      log_scale: ``None`` for the mean squared error, or a scalar for the Platt loss with that log scale.
    Returns:
      ``(loss, dL/dx_s, dL/dy_s)``, and ``dL/dlog_scale`` as a fourth item with ``log_scale``.
    """
    spec, budget = kernel_fn.spec, kernel_fn.tile_budget()
    stats_s = kernels.tiled_self_stats(spec, x_s, budget)
    stats_t = kernels.tiled_self_stats(spec, x_t, budget)
    k_ss = kernels.kernel_matrix_from_stats(spec, x_s, stats_s, x_s, stats_s, get, budget)
    k_ts = kernels.kernel_matrix_from_stats(spec, x_t, stats_t, x_s, stats_s, get, budget)
    loss, loss_vjp = jax.vjp(lambda kss, kts, ys, scale: kip_loss(kts, kss, ys, y_t, reg, scale), k_ss, k_ts, y_s,
                             log_scale)
    d_kss, d_kts, d_ys, d_log_scale = loss_vjp(jnp.ones_like(loss))
    # K(x, x) with cotangent G: the gradients through both arguments sum to one through the first with
    # G + G^T (K(a, b) = K(b, a)^T), so only half of the blocks' backward passes are needed.
    dx_ss, dstats_ss, _, _ = kernels.kernel_matrix_vjp(spec, x_s, stats_s, x_s, stats_s, d_kss + d_kss.T, get,
                                                       budget, wrt=(True, False))
    _, _, dx_ts, dstats_ts = kernels.kernel_matrix_vjp(spec, x_t, stats_t, x_s, stats_s, d_kts, get, budget,
                                                       wrt=(False, True))
    dstats = jax.tree_util.tree_map(jnp.add, dstats_ss, dstats_ts)
    dx_s = dx_ss + dx_ts + kernels.tiled_self_stats_vjp(spec, x_s, dstats, budget)
    return (loss, dx_s, d_ys) if log_scale is None else (loss, dx_s, d_ys, d_log_scale)


def make_step(kernel_fn: KernelFn, config: KipConfig, optimizer, table, counts, per_class_target: int):
    """The jitted KIP step ``(params, opt_state, key, fixed_labels, x_train, y_train) -> (..., loss)``.

    With a random-feature kernel the step draws its networks from the run's key (a third split of the
    step's key) unless ``config.rf_fixed_networks``; the gradient goes through the features directly.
    """
    random_features = config.kernel.random_features is not None

    @jax.jit
    def step(params, opt_state, key, fixed_labels, x_train, y_train):
        if random_features:
            key, sample_key, network_key = jax.random.split(key, 3)
        else:
            key, sample_key = jax.random.split(key)
        idx = sample_balanced(sample_key, table, counts, per_class_target)
        labels = params.get("labels", fixed_labels)
        log_scale = params.get("log_scale")
        if random_features:
            out = rf.krr_loss_and_gradients(
                config.kernel, None if config.rf_fixed_networks else network_key, config.reg, params["images"],
                labels, x_train[idx], y_train[idx], kernel_fn.tile_budget(), learn_labels="labels" in params,
                log_scale=log_scale)
        else:
            out = krr_loss_and_gradients(kernel_fn, config.get, config.reg, params["images"], labels, x_train[idx],
                                         y_train[idx], log_scale=log_scale)
        loss, d_images, d_labels = out[:3]
        grads = _params(d_images, d_labels, "labels" in params, out[3] if log_scale is not None else None)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    return step


def make_backend_step(backend, kernel_fn: KernelFn, config: KipConfig, optimizer, table, counts,
                      per_class_target: int, train):
    """The KIP step of :func:`make_step` with the kernel work on ``backend`` (e.g. Ray workers).

    Same signature and same numbers (up to summation order) as :func:`make_step`: the target batch is
    drawn here with the same key chain, sent to the backend as indices into ``train`` (the training
    images the backend holds, from ``backend.put``), and the optimiser update runs here. It cannot be one
    ``jax.jit``: the kernel blocks are computed in other processes.
    """

    @jax.jit
    def sample(key):
        key, sample_key = jax.random.split(key)
        return key, sample_balanced(sample_key, table, counts, per_class_target)

    @jax.jit
    def update(params, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(params, opt_state, key, fixed_labels, x_train, y_train):
        key, idx = sample(key)
        labels = params.get("labels", fixed_labels)
        loss, d_images, d_labels = backend.kip_loss_and_gradients(
            kernel_fn, config.get, config.reg, params["images"], labels, train, np.asarray(idx), y_train[idx])
        grads = {"images": d_images, "labels": d_labels} if "labels" in params else {"images": d_images}
        params, opt_state = update(params, grads, opt_state)
        return params, opt_state, key, loss

    return step


# ----------------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(out_dir: pathlib.Path, state: KipState) -> None:
    arrays = dict(step=np.int64(state.step), images=state.images, labels=state.labels, key=state.key,
                  best_images=state.best_images, best_labels=state.best_labels,
                  best_accuracy=np.float64(state.best_accuracy), best_step=np.int64(state.best_step),
                  last_accuracy=np.float64(np.nan if state.last_accuracy is None else state.last_accuracy),
                  best_test_accuracy=np.float64(np.nan if state.best_test_accuracy is None
                                                else state.best_test_accuracy),
                  last_val_accuracy=np.float64(np.nan if state.last_val_accuracy is None else state.last_val_accuracy),
                  log_scale=np.float64(state.log_scale), num_opt_leaves=np.int64(len(state.opt_leaves)))
    for i, leaf in enumerate(state.opt_leaves):
        arrays[f"opt_{i}"] = np.asarray(leaf)
    atomic_savez(out_dir / CHECKPOINT, **arrays)


def load_checkpoint(out_dir: pathlib.Path) -> tuple[KipConfig, KipState]:
    """Read ``config.json`` and ``checkpoint.npz`` from a run folder, with a clear error if unusable."""
    out_dir = pathlib.Path(out_dir)
    config_path, checkpoint_path = out_dir / CONFIG, out_dir / CHECKPOINT
    if not out_dir.is_dir():
        raise KernelDistillError(f"cannot resume: {out_dir} is not a folder")
    if not config_path.is_file():
        raise KernelDistillError(f"cannot resume: {out_dir} has no {CONFIG} (not a KIP run folder)")
    if not checkpoint_path.is_file():
        raise KernelDistillError(f"cannot resume: {out_dir} has no {CHECKPOINT} (the run stopped before its first "
                                 f"checkpoint); start it again with --out {out_dir} --overwrite")
    try:
        config = KipConfig.from_dict(json.loads(config_path.read_text()))
    except KernelDistillError as e:
        raise KernelDistillError(f"cannot resume from {out_dir}: {CONFIG}: {e}") from None
    except (ValueError, OSError) as e:  # bad JSON or UTF-8, unreadable file
        raise KernelDistillError(f"cannot resume from {out_dir}: {CONFIG} is unreadable ({e})") from None
    try:
        with np.load(checkpoint_path, allow_pickle=False) as f:
            leaves = [f[f"opt_{i}"] for i in range(int(f["num_opt_leaves"]))]
            def optional(name):
                value = float(f[name]) if name in f.files else math.nan
                return None if math.isnan(value) else value

            state = KipState(step=int(f["step"]), images=f["images"], labels=f["labels"], opt_leaves=leaves,
                             key=f["key"], best_images=f["best_images"], best_labels=f["best_labels"],
                             best_accuracy=float(f["best_accuracy"]), best_step=int(f["best_step"]),
                             last_accuracy=optional("last_accuracy"),
                             best_test_accuracy=optional("best_test_accuracy"),
                             last_val_accuracy=optional("last_val_accuracy"),
                             log_scale=float(f["log_scale"]) if "log_scale" in f.files else 0.0)
            if state.best_test_accuracy is None and config.select_on == "test":  # an older checkpoint
                state.best_test_accuracy = state.best_accuracy if state.best_step >= 0 else None
    except Exception as e:  # a truncated zip, bad zlib data, a missing key: all mean the checkpoint is unusable
        raise KernelDistillError(f"cannot resume from {out_dir}: unreadable {CHECKPOINT} "
                                 f"({type(e).__name__}: {e})") from None
    _check_checkpoint_matches(out_dir, config, state)
    return config, state


def _check_checkpoint_matches(out_dir: pathlib.Path, config: KipConfig, state: KipState) -> None:
    """A checkpoint and a config.json from two different runs (a mixed folder) are refused, not continued."""
    images, labels = np.asarray(state.images), np.asarray(state.labels)
    problems = []
    if images.ndim != 4 or labels.ndim != 2 or len(images) != len(labels):
        problems.append(f"support arrays of shapes {images.shape} and {labels.shape}")
    elif len(images) != config.per_class * labels.shape[1]:
        problems.append(f"{len(images)} support images where {CONFIG} says {config.per_class} per class for "
                        f"{labels.shape[1]} classes")
    elif np.shape(state.best_images) != images.shape or np.shape(state.best_labels) != labels.shape:
        problems.append("a best support of another shape than the support")
    elif state.step < 0 or np.shape(state.key) != (2,):
        problems.append(f"step {state.step} and a random key of shape {np.shape(state.key)}")
    if problems:
        raise KernelDistillError(f"cannot resume from {out_dir}: {CHECKPOINT} holds {problems[0]} (the folder mixes "
                                 f"two runs, or was edited); start a new run")


def _read_metrics(path: pathlib.Path, up_to_step: int) -> list[dict]:
    return [r for r in runs.read_json_lines(path) if r.get("step", 0) <= up_to_step]


# ----------------------------------------------------------------------------------------------------
# The run.


def initial_state(config: KipConfig, data: PreparedData, optimizer) -> KipState:
    from kernel_distill.data import class_balanced_indices

    key = jax.random.PRNGKey(config.seed)
    key, init_key = jax.random.split(key)
    if config.init == "file":
        images, labels = warm_start_support(config, data)
    else:
        idx = class_balanced_indices(data.y_train, config.per_class, data.num_classes, init_key)
        labels = centered_one_hot(data.y_train[idx], data.num_classes).astype(config.dtype)
        if config.init == "real":
            images = data.x_train[idx].astype(config.dtype)
        else:
            images = np.asarray(jax.random.normal(init_key, data.x_train[idx].shape), config.dtype)
    state = KipState(step=0, images=images, labels=labels, opt_leaves=[], key=np.asarray(key),
                     best_images=images.copy(), best_labels=labels.copy())
    state.opt_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(optimizer.init(_state_params(state, config)))]
    return state


def warm_start_support(config: KipConfig, data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``config.init_file``, checked to fit the run: ``(n, H, W, C)``, ``(n, C)``.

    The set must be of the run's dataset, hold ``per_class`` images per class, and have been preprocessed
    exactly as the run preprocesses (same channel statistics, same ZCA or none: the same validation split
    and ``--zca`` settings), since its images live in that space. Anything else is refused with one line.
    """
    from kernel_distill.io import dataset_of, load_distilled
    from kernel_distill.zoo import file_sha256

    source = config.init_file
    if config.init_sha256 is not None and file_sha256(source) != config.init_sha256:
        raise KernelDistillError(f"{source}: its sha256 is not the one this run recorded ({config.init_sha256[:12]}...): "
                                 f"the file changed since the run started")
    distilled = load_distilled(source)
    dataset_of(distilled, source, data.name)
    want = config.per_class * data.num_classes
    if distilled.images.shape[1:] != data.x_train.shape[1:] or distilled.num_classes != data.num_classes:
        raise KernelDistillError(f"{source}: images {distilled.images.shape[1:]} with {distilled.num_classes} classes "
                                 f"do not fit {data.name} ({data.x_train.shape[1:]}, {data.num_classes} classes)")
    if len(distilled.images) != want:
        raise KernelDistillError(f"{source} holds {len(distilled.images)} images, not {config.per_class} per class "
                                 f"({want}): set --per-class {len(distilled.images) / data.num_classes:g}")
    mine, theirs = data.preprocessor, distilled.preprocessor
    if theirs is None:
        raise KernelDistillError(f"{source} does not record its preprocessing (a released KIP file?): its images "
                                 f"cannot be placed in this run's input space")
    # The zoo stores large ZCA matrices in float16, hence the looser tolerance for them.
    same = (np.allclose(mine.mean, theirs.mean, rtol=1e-5, atol=1e-7)
            and np.allclose(mine.std, theirs.std, rtol=1e-5, atol=1e-7)
            and mine.uses_zca == theirs.uses_zca
            and (not mine.uses_zca or (mine.zca_layer_norm == theirs.zca_layer_norm and np.allclose(
                mine.zca_matrix, theirs.zca_matrix, rtol=1e-2, atol=1e-3 * float(np.abs(mine.zca_matrix).max())))))
    if not same:
        raise KernelDistillError(
            f"{source} was preprocessed differently from this run (channel statistics or ZCA); a warm start needs "
            f"the same --zca/--zca-reg and --val-size as the run that made it")
    return distilled.images.astype(config.dtype), distilled.labels.astype(config.dtype)


DEFAULT_TARGET_BATCH = 5000


def prepare_for(config: KipConfig, data_dir=None, progress: bool = True):
    """Load and preprocess ``config.dataset`` with the validation split and test limit ``config`` asks for."""
    from kernel_distill.data import prepare_dataset

    return prepare_dataset(config.dataset, data_dir, zca=config.zca, zca_reg=config.zca_reg,
                           test_limit=config.test_limit, progress=progress, val_size=config.effective_val_size)


def available_memory_bytes() -> int:
    """Physical memory of this machine (the bound a step's arrays must fit in)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_feasible(config: KipConfig, data: PreparedData) -> int:
    """Validate the run against the data; returns the target images drawn per class each step."""
    if data.num_val != config.effective_val_size:
        raise KernelDistillError(f"the run holds out {config.effective_val_size} validation images, the prepared "
                                 f"data has {data.num_val}: prepare it with kip.prepare_for(config)")
    counts = np.bincount(data.y_train, minlength=data.num_classes)
    if config.per_class > counts.min():
        raise KernelDistillError(f"--per-class {config.per_class} is larger than the smallest class of "
                                 f"{data.name} ({counts.min()} training images)")
    if config.target_batch_size is None:
        per_class_target = min(DEFAULT_TARGET_BATCH // data.num_classes, int(counts.min()))
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
    available = available_memory_bytes()
    if needed > 0.8 * available:
        raise KernelDistillError(
            f"a target batch of {n_target} with {n_support} support images needs about {needed / 2**30:.1f} GiB "
            f"per step, more than this machine's {available / 2**30:.1f} GiB: lower --target-batch")
    return per_class_target


RUN_FILES = (CONFIG, CHECKPOINT, METRICS, "distilled.npz", "distilled_best.npz", "grid.png", "curve.png",
             "results.json")


def run_kip(config: KipConfig, data: PreparedData, out_dir: str | os.PathLike, resume: bool = False,
            progress: bool = True, log=print, overwrite: bool = False,
            command_line: list[str] | None = None, backend=None) -> dict:
    """Run (or resume) KIP, writing everything into ``out_dir``. Returns a summary dict.

    The folder belongs to this run (:func:`kernel_distill.runs.claim_run_folder`): a new run refuses a
    non-empty folder unless ``overwrite``, and a live run holds its lock. A resumed run must use the saved
    config except for :data:`RESUMABLE_FIELDS`, and ``config.steps`` must lie beyond the checkpoint.
    A step-0 checkpoint is written before the first step, so a run killed at any point can be resumed.
    On Ctrl-C the state is checkpointed and outputs are written before ``KeyboardInterrupt`` propagates.
    A NaN or inf loss or support stops the run with :class:`KernelDistillError`; the last good checkpoint
    stays. ``command_line`` goes into ``results.json`` (default ``sys.argv``). ``config.float64`` turns
    on JAX's 64-bit mode for the run (and only for it).
    """
    with runs.claim_run_folder(out_dir, resume=resume, overwrite=overwrite, run_files=RUN_FILES,
                               command="kip") as folder:
        with jax.enable_x64(True) if config.float64 else contextlib.nullcontext():
            return _run_kip_in(config, data, folder, resume, progress, log, command_line, backend)


def check_resume(out_dir: pathlib.Path, config: KipConfig, flag_of=config_flag) -> tuple[KipState, dict]:
    """Load the checkpoint of ``out_dir`` and check that ``config`` may continue it.

    Returns the state and the allowed changes ``{field: [saved, new]}``; raises naming the option of any
    other change, or when ``config.steps`` does not lie beyond the checkpoint.
    """
    saved, state = load_checkpoint(out_dir)
    changes = runs.resume_changes(saved.to_dict(), config.to_dict(), RESUMABLE_FIELDS, flag_of)
    if config.steps < state.step or (config.steps == state.step and outputs_complete(out_dir, state.step)):
        raise KernelDistillError(f"the checkpoint in {out_dir} is at step {state.step} and the run asks for "
                                 f"{config.steps} steps in all: nothing to do; give --steps above {state.step}")
    return state, changes


def outputs_complete(out_dir: pathlib.Path, step: int) -> bool:
    """Whether ``out_dir`` holds every output of its checkpoint's ``step``: ``results.json`` (written last)
    says that step and each artifact it names exists. A run killed after its last checkpoint but before or
    during these writes is not complete, and ``--resume`` finishes it without new steps."""
    try:
        record = json.loads((out_dir / "results.json").read_text())
        recorded_step = record["metrics"]["steps"]
        artifacts = record["artifacts"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return recorded_step == step and all((out_dir / name).is_file() for name in artifacts)


def _run_kip_in(config: KipConfig, data: PreparedData, out_dir: pathlib.Path, resume: bool, progress: bool,
                log, command_line: list[str] | None = None, backend=None) -> dict:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if resume:
        state, changes = check_resume(out_dir, config)
    per_class_target = check_feasible(config, data)
    kernel_fn = make_kernel_fn(config.kernel, memory_budget_bytes=int(config.memory_budget_mb * 2**20))
    optimizer = make_optimizer(config)
    table, counts = class_index_table(data.y_train, data.num_classes)
    if backend is None or isinstance(backend, LocalBackend):
        backend = None  # the local step stays one jitted function
        step_fn = make_step(kernel_fn, config, optimizer, jnp.asarray(table), jnp.asarray(counts), per_class_target)
    elif config.loss != "mse":
        raise KernelDistillError(f"KIP with --loss {config.loss} runs on the local backend only; --backend ray "
                                 f"distributes the mean squared error")
    elif config.kernel.random_features is not None:
        raise KernelDistillError(f"KIP with the {config.kernel.name} kernel runs on the local backend only (its step "
                                 f"is a few random networks' features, not kernel blocks); --backend ray serves "
                                 f"its evaluations in label-solve, evaluate and baseline")
    else:
        step_fn = make_backend_step(backend, kernel_fn, config, optimizer, jnp.asarray(table), jnp.asarray(counts),
                                    per_class_target, backend.put(np.asarray(data.x_train, config.dtype)))

    if not resume:
        state = initial_state(config, data, optimizer)
    params = _state_params(state, config)
    treedef = jax.tree_util.tree_structure(optimizer.init(params))
    fresh_leaves = jax.tree_util.tree_leaves(optimizer.init(params))
    if treedef.num_leaves != len(state.opt_leaves) or any(
            np.shape(a) != np.shape(b) for a, b in zip(fresh_leaves, state.opt_leaves)):
        raise KernelDistillError(f"cannot resume from {out_dir}: its optimiser state does not match this config")
    if resume and (state.images.shape[1:] != data.x_train.shape[1:] or state.labels.shape[1] != data.num_classes):
        raise KernelDistillError(f"cannot resume from {out_dir}: its support ({state.images.shape[1:]} images, "
                                 f"{state.labels.shape[1]} classes) does not fit {data.name}")
    if resume:
        records = _read_metrics(out_dir / METRICS, state.step)
        runs.append_history(out_dir, "resume", state.step, changes=changes, backend=_backend_record(backend))
    else:
        records = []
        runs.append_history(out_dir, "start", 0, config=config.to_dict(), backend=_backend_record(backend))
    atomic_write_text(out_dir / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in state.opt_leaves])
    key = jnp.asarray(state.key)
    fixed_labels = jnp.asarray(state.labels)
    x_train = jnp.asarray(data.x_train, config.dtype)
    y_train = jnp.asarray(centered_one_hot(data.y_train, data.num_classes), config.dtype)

    def sync_state():
        state.images = np.asarray(params["images"])
        state.labels = np.asarray(params["labels"]) if config.learn_labels else np.asarray(fixed_labels)
        state.opt_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(opt_state)]
        state.key = np.asarray(key)
        state.log_scale = float(params["log_scale"]) if "log_scale" in params else 0.0

    def append_metrics(record):
        records.append(record)
        runs.append_line(out_dir / METRICS, json.dumps(record))

    def evaluate_now():
        record = dict(step=state.step)
        if data.num_val:
            val = evaluate(kernel_fn, state.images, state.labels, data.x_val, data.y_val, reg=config.reg,
                           get=config.get, progress=False, backend=backend)
            state.last_val_accuracy = val.accuracy
            record.update(val_accuracy=val.accuracy, val_loss=val.mse_loss)
        result = evaluate(kernel_fn, state.images, state.labels, data.x_test[:config.test_limit],
                          data.y_test[:config.test_limit], reg=config.reg, backend=backend,
                          get=config.get, progress=False)
        state.last_accuracy = result.accuracy
        selected = result.accuracy if config.select_on == "test" else state.last_val_accuracy
        if selected > state.best_accuracy:
            state.best_accuracy, state.best_step = selected, state.step
            state.best_test_accuracy = result.accuracy
            state.best_images, state.best_labels = state.images.copy(), state.labels.copy()
        record.update(test_accuracy=result.accuracy, test_loss=result.mse_loss, time=time.time())
        append_metrics(record)
        return result.accuracy

    if state.step == 0 and not records:
        evaluate_now()
    if not resume:  # a run killed before its first periodic checkpoint resumes from here
        save_checkpoint(out_dir, state)

    interrupted = False
    bar = tqdm(total=config.steps, initial=state.step, desc="KIP", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while state.step < config.steps:
            new_params, new_opt_state, new_key, loss = step_fn(params, opt_state, key, fixed_labels, x_train,
                                                               y_train)
            loss = float(loss)
            finite_support = all(bool(jnp.all(jnp.isfinite(v))) for v in new_params.values())
            if not math.isfinite(loss) or not finite_support:
                what = (f"the KRR loss became {loss}" if not math.isfinite(loss) else
                        f"the support became NaN or inf (loss {loss:.4g} before the update)")
                raise KernelDistillError(
                    f"{what} at step {state.step + 1}; stopped. {out_dir} keeps the last good checkpoint "
                    f"(step {_checkpoint_step(out_dir)}); a resume would repeat this: start a new run with a lower "
                    f"--lr or a higher --reg")
            params, opt_state, key = new_params, new_opt_state, new_key
            state.step += 1
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == config.steps:
                record = dict(step=state.step, loss=loss)
                if "log_scale" in params:
                    record["platt_scale"] = math.exp(float(params["log_scale"]))
                append_metrics(record)
            if state.step % config.eval_every == 0 or state.step == config.steps:
                sync_state()
                evaluate_now()
            bar.set_postfix(loss=f"{loss:.3g}", val=_pct(state.last_val_accuracy), test=_pct(state.last_accuracy),
                            refresh=False)
            if state.step % config.checkpoint_every == 0:
                sync_state()
                save_checkpoint(out_dir, state)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    sync_state()
    save_checkpoint(out_dir, state)
    summary = write_outputs(config, data, state, records, out_dir, wall_seconds=time.perf_counter() - started,
                            command_line=command_line)
    if interrupted:
        log(f"interrupted at step {state.step}: checkpoint and outputs written to {out_dir}; "
            f"continue with --resume {out_dir}")
        raise KeyboardInterrupt
    return summary


def _backend_record(backend) -> dict:
    return backend.describe() if backend is not None else dict(backend="local")


def _checkpoint_step(out_dir: pathlib.Path):
    try:
        with np.load(out_dir / CHECKPOINT) as f:
            return int(f["step"])
    except Exception:
        return "none written"


def _pct(value):
    return "-" if value is None or value < 0 else f"{100 * value:.2f}%"


def write_outputs(config: KipConfig, data: PreparedData, state: KipState, records: list[dict],
                  out_dir: pathlib.Path, wall_seconds: float | None = None,
                  command_line: list[str] | None = None) -> dict:
    """distilled.npz (last), distilled_best.npz, grid.png, curve.png, results.json; returns the summary."""
    from kernel_distill import plots
    from kernel_distill.results import dataset_record, make_record, write_results

    selection = dict(split=config.select_on, val_size=data.num_val, step=state.best_step,
                     accuracy=state.best_accuracy)
    base_meta = dict(dataset=data.name, method="kip", per_class=config.per_class, seed=config.seed,
                     kernel=config.kernel.to_dict(), get=config.get, reg=config.reg, learn_labels=config.learn_labels,
                     config=config.to_dict(), selection=selection,
                     config_history=[{k: v for k, v in r.items() if k != "config"} for r in runs.read_history(out_dir)])
    last_meta = dict(base_meta, step=state.step,
                     metrics=dict(test_accuracy=state.last_accuracy, val_accuracy=state.last_val_accuracy))
    best_meta = dict(base_meta, step=state.best_step,
                     metrics=dict(test_accuracy=state.best_test_accuracy,
                                  val_accuracy=state.best_accuracy if config.select_on == "validation" else None))
    save_distilled(out_dir / "distilled.npz", DistilledSet(state.images, state.labels, data.preprocessor, last_meta))
    save_distilled(out_dir / "distilled_best.npz",
                   DistilledSet(state.best_images, state.best_labels, data.preprocessor, best_meta))
    viewable = data.preprocessor.to_viewable(state.images)
    # initial_state draws class by class; a warm-started support's classes are its labels' (None)
    original = None if config.init == "file" else np.repeat(np.arange(data.num_classes), config.per_class)
    plots.save_figure(out_dir / "grid.png", plots.image_grid_figure(
        viewable, state.labels, data.num_classes, data.class_names,
        title=f"KIP {data.name}, {config.per_class}/class, step {state.step}", original_classes=original))
    plots.save_figure(out_dir / "curve.png", plots.learning_curve_figure(
        records, title=f"KIP {data.name}, {config.kernel.architecture} {config.get.upper()}"))
    summary = dict(step=state.step, last_accuracy=state.last_accuracy, best_accuracy=state.best_accuracy,
                   best_step=state.best_step, best_test_accuracy=state.best_test_accuracy,
                   last_val_accuracy=state.last_val_accuracy, select_on=config.select_on, out_dir=str(out_dir))
    # The headline number is the selected support's (distilled_best.npz): selected on validation unless
    # the run asked for the papers' test-set selection, which ``selection`` then says.
    metrics = dict(test_accuracy=state.best_test_accuracy, test_accuracy_final=state.last_accuracy,
                   val_accuracy_best=state.best_accuracy if config.select_on == "validation" else None,
                   val_accuracy_final=state.last_val_accuracy, best_step=state.best_step, steps=state.step,
                   support_size=len(state.images), num_test=len(data.y_test[:config.test_limit]))
    curves = {key: [[r["step"], r[key]] for r in records if r.get(key) is not None]
              for key in ("loss", "val_accuracy", "test_accuracy")}
    record = make_record("kip", "kip", dataset_record(data.name, data.checksums, num_train=len(data.y_train),
                                                      num_val=data.num_val,
                                                      num_test=len(data.y_test[:config.test_limit])),
                         {k: v for k, v in metrics.items() if v is not None}, config.to_dict(), selection=selection,
                         curves=curves, artifacts=dict(distilled="distilled.npz", distilled_best="distilled_best.npz",
                                                       grid="grid.png", curve="curve.png", metrics="metrics.jsonl"),
                         dtype=np.dtype(config.dtype).name, wall_seconds=wall_seconds, argv=command_line)
    write_results(out_dir, record)
    return summary
