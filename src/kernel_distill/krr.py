"""Kernel ridge regression, the inner loop of KIP and the evaluation of every distilled set.

For a support set ``(X_s, y_s)`` of ``n`` points and targets ``X_t``::

    pred = K_ts (K_ss + reg * trace(K_ss) / n * I)^-1 y_s

The regulariser is relative to the mean eigenvalue of ``K_ss`` (KIP's convention), so ``reg`` means the
same across kernels and scales. ``krr_predict``/``krr_loss`` are differentiable JAX functions, defined with
KIP's gradient in :mod:`kernel_distill.objective`; :func:`evaluate` is the blocked, float64-solved test-set
evaluation with a progress bar.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelFn, RandomFeatureKernelFn
from kernel_distill.kernels.api import Get
# The differentiable KRR predictor and KIP's losses live with their gradient in the objective module; they are
# this module's names too, where every caller has found them.
from kernel_distill.objective import (  # noqa: F401
    DEFAULT_REG, KIP_LOSSES, kip_loss, krr_loss, krr_platt_loss, krr_predict, regularized, ridge)

if TYPE_CHECKING:
    import numpy.typing as npt
    from jax.typing import ArrayLike


def accuracy(pred: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Fraction of rows whose argmax equals the integer label. ``(n, C), (n,) -> ()``."""
    return jnp.mean(jnp.argmax(pred, axis=-1) == labels)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    accuracy: float
    mse_loss: float
    num_test: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def solve_support(k_ss: np.ndarray, y_s: np.ndarray, reg: float = DEFAULT_REG) -> np.ndarray:
    """``(K_ss + reg tr/n I)^-1 y_s`` in float64 with a clear error when the system is not positive definite.

    ``(n, n), (n, C) -> (n, C)`` float64.
    """
    import scipy.linalg

    k = np.asarray(k_ss, dtype=np.float64)
    if not np.all(np.isfinite(k)):
        raise KernelDistillError("the support kernel has NaN or inf entries; check the support images")
    k = k + ridge(k, reg) * np.eye(k.shape[0])
    try:
        factor = scipy.linalg.cho_factor(k, lower=True)
    except np.linalg.LinAlgError:
        raise KernelDistillError(
            f"the regularised support kernel is not positive definite (reg={reg:g}); the support set may hold "
            f"duplicate images: raise --reg") from None
    return scipy.linalg.cho_solve(factor, np.asarray(y_s, dtype=np.float64))


def feature_weights(phi_s: np.ndarray, y_s: np.ndarray, reg: float = DEFAULT_REG) -> np.ndarray:
    """KRR in feature space, for a kernel ``K = Phi Phi^T`` with fewer features ``D`` than support points.

    ``Phi_t Phi_s^T (Phi_s Phi_s^T + l I)^-1 y_s = Phi_t (Phi_s^T Phi_s + l I)^-1 Phi_s^T y_s`` (the push-through
    identity), with the same ``l = reg * trace(K_ss) / n`` (``trace(K_ss) = ||Phi_s||_F^2``): a ``(D, D)``
    solve instead of ``(n, n)``. ``(n, D), (n, C) -> (D, C)`` float64 weights; predictions are ``Phi_t @ w``.
    """
    import scipy.linalg

    phi = np.asarray(phi_s, dtype=np.float64)
    if not np.all(np.isfinite(phi)):
        raise KernelDistillError("the support features have NaN or inf entries; check the support images")
    ridge_value = reg * float(np.sum(phi * phi)) / phi.shape[0]
    system = phi.T @ phi + ridge_value * np.eye(phi.shape[1])
    try:
        factor = scipy.linalg.cho_factor(system, lower=True)
    except np.linalg.LinAlgError:
        raise KernelDistillError(f"the regularised feature system is not positive definite (reg={reg:g}): raise "
                                 f"--reg") from None
    return scipy.linalg.cho_solve(factor, phi.T @ np.asarray(y_s, dtype=np.float64))


def uses_feature_space(kernel_fn: Callable[..., Any], n_support: int, image_shape: tuple) -> bool:
    """Whether KRR is cheaper through the features (more support points than features) for this kernel."""
    return (isinstance(kernel_fn, RandomFeatureKernelFn)
            and n_support > kernel_fn.feature_dimension(tuple(image_shape)))


def feature_blocks(kernel_fn: RandomFeatureKernelFn, x: np.ndarray, block_size: int = 1000) -> np.ndarray:
    """``Phi(x)`` of the kernel's fixed networks, computed in padded blocks: ``(n, ...) -> (n, D)`` float64."""
    out = [np.asarray(kernel_fn.features(block), np.float64)[:len(x) - start]
           for start, block in padded_row_blocks(x, block_size)]
    return np.concatenate(out)


class padded_row_blocks:
    """``(start, block)`` pairs over the rows of ``x``; the last block is padded (by repeating its last row)
    to ``block_size`` rows, so a jitted function sees one shape and compiles once. Callers drop the
    padded rows of the output (``[:len(x) - start]``)."""

    def __init__(self, x, block_size: int):
        if block_size < 1:
            raise KernelDistillError("block size must be positive")
        self.x, self.block_size = x, min(block_size, max(1, len(x)))

    def __len__(self):
        return -(-len(self.x) // self.block_size)

    def __iter__(self):
        for start in range(0, len(self.x), self.block_size):
            block = np.asarray(self.x[start:start + self.block_size])
            missing = self.block_size - len(block)
            if missing:
                block = np.concatenate([block, np.repeat(block[-1:], missing, axis=0)])
            yield start, block


def cross_kernel(kernel_fn: Callable, x1: ArrayLike, x2: ArrayLike, get: str = "ntk") -> jax.Array | np.ndarray:
    """``kernel_fn(x1, x2, get)`` through a jitted function cached per kernel function and ``get``, so
    repeated evaluations (KIP evaluates every few hundred steps) do not recompile."""
    if isinstance(kernel_fn, (KernelFn, RandomFeatureKernelFn)):
        return kernel_fn.jitted(cast(Get, get))(x1, x2)  # the kernel function checks get
    return kernel_fn(x1, x2, get=get)


# backend: a kernel_distill.distributed.Backend or None; Any, as a Backend takes a KernelFn and a Get where these
# functions take any kernel callable and a str (a backend is only given the kernels make_kernel_fn builds)
def evaluate(kernel_fn: Callable, x_support: npt.ArrayLike, y_support: np.ndarray, x_test: npt.ArrayLike,
             labels_test: npt.ArrayLike, reg: float = DEFAULT_REG, get: str = "ntk", block_size: int = 1000,
             progress: bool = True, description: str = "KRR test", backend: Any = None) -> EvalResult:
    """KRR accuracy and MSE of a support set on a whole test set, test points processed in blocks.

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get) -> (n1, n2)``, e.g. from :func:`kernel_distill.kernels.make_kernel_fn`.
      x_support: ``(n, ...)`` support inputs (preprocessed). y_support: ``(n, C)`` float labels.
      x_test: ``(m, ...)`` test inputs (preprocessed). labels_test: int ``(m,)``.
      block_size: test points per kernel call; bounds memory.
      backend: a :class:`kernel_distill.distributed.Backend` that computes the test blocks' predictions
        (``None``: here, block after block); the test images are handed to it once (``backend.put``).
    Returns:
      :class:`EvalResult` with accuracy in [0, 1] and the MSE loss against centred one-hot test labels.
    """
    return evaluate_label_sets(kernel_fn, x_support, [y_support], x_test, labels_test, reg, get, block_size,
                               progress, description, backend)[0]


# backend: a kernel_distill.distributed.Backend or None (Any: see evaluate)
def evaluate_label_sets(kernel_fn: Callable, x_support: npt.ArrayLike, label_sets: Sequence[np.ndarray],
                        x_test: npt.ArrayLike, labels_test: npt.ArrayLike, reg: float = DEFAULT_REG,
                        get: str = "ntk", block_size: int = 1000, progress: bool = True,
                        description: str = "KRR test", backend: Any = None) -> list[EvalResult]:
    """:func:`evaluate` for several label sets ``[(n, C), ...]`` of one support, with one pass of test kernels:
    KRR is linear in the labels, so the sets are solved and predicted side by side as columns of one matrix
    (the test kernel, the costly part with a ConvNet kernel, is computed once instead of once per set)."""
    from tqdm.auto import tqdm

    x_support = np.asarray(x_support)
    label_sets = [np.asarray(y) for y in label_sets]
    x_test, labels_test = np.asarray(x_test), np.asarray(labels_test)
    for y_support in label_sets:
        if y_support.ndim != 2 or y_support.shape[0] != x_support.shape[0]:
            raise KernelDistillError(
                f"support labels must be (n, C) with n = {x_support.shape[0]} images, got {y_support.shape}")
        if not np.all(np.isfinite(y_support)):
            raise KernelDistillError("support labels contain NaN or inf")
    if x_test.shape[1:] != x_support.shape[1:]:
        raise KernelDistillError(f"test images {x_test.shape[1:]} do not match support images {x_support.shape[1:]}")
    for name, arr in (("support images", x_support), ("test images", x_test)):
        if not np.all(np.isfinite(arr)):
            raise KernelDistillError(f"{name} contain NaN or inf")
    widths = [y.shape[1] for y in label_sets]
    columns = np.cumsum([0, *widths])
    stacked = np.concatenate(label_sets, axis=1)
    in_feature_space = backend is None and uses_feature_space(kernel_fn, len(x_support), x_support.shape[1:])
    if in_feature_space:
        assert isinstance(kernel_fn, RandomFeatureKernelFn)  # uses_feature_space checked it
        weights = feature_weights(feature_blocks(kernel_fn, x_support, block_size), stacked, reg)
    else:
        alpha = solve_support(kernel_fn(x_support, x_support, get=get), stacked, reg)
    correct, squared_error = np.zeros(len(label_sets), np.int64), np.zeros(len(label_sets))

    def score(pred: np.ndarray, labels: np.ndarray) -> None:
        for k, width in enumerate(widths):
            part = pred[:, columns[k]:columns[k + 1]]
            correct[k] += int(np.sum(part.argmax(axis=1) == labels))
            target = np.eye(width)[labels] - 1.0 / width
            squared_error[k] += float(np.sum((part - target) ** 2))

    if backend is not None:
        score(backend.predictions(kernel_fn, get, x_support, alpha, backend.put(x_test), block_size), labels_test)
    else:
        blocks = padded_row_blocks(x_test, block_size)
        for start, xb in tqdm(blocks, total=len(blocks), desc=description, disable=not progress, leave=False,
                              unit="block"):
            if in_feature_space:
                assert isinstance(kernel_fn, RandomFeatureKernelFn)  # uses_feature_space checked it
                pred = np.asarray(kernel_fn.features(xb), dtype=np.float64) @ weights
            else:
                pred = np.asarray(cross_kernel(kernel_fn, xb, x_support, get), dtype=np.float64) @ alpha
            lb = labels_test[start:start + block_size]
            score(pred[:len(lb)], lb)
    m = len(x_test)
    return [EvalResult(accuracy=int(c) / m, mse_loss=0.5 * float(e) / (m * w), num_test=m)
            for c, e, w in zip(correct, squared_error, widths)]
