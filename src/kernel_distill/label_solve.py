"""Label Solve: closed-form optimal labels for a fixed (natural) support, over the whole training set.

KRR with support ``(X_s, y_s)`` predicts ``K_ts (K_ss + lam I)^-1 y_s`` on the training set, with
``lam = reg * trace(K_ss) / n`` exactly as in :mod:`kernel_distill.krr`. Writing ``z = (K_ss + lam I)^-1 y_s``,
the training-set MSE is a least-squares problem in ``z``; its ridge solution gives the labels

    y_s = (K_ss + lam I) (K_st K_ts + eps I)^-1 K_st y_t,     eps = ls_reg * trace(K_st K_ts) / n

where ``y_t`` are the mean-centred one-hot labels of the whole training set. (Nguyen et al., NeurIPS 2021,
"Label Solve"; we regularise the outer factor with the same ``lam`` the evaluation uses, so the solved
labels are optimal for the predictor that is scored, and the inner Gram matrix relatively, like KIP's reg.)

``K_st K_ts`` (n x n) and ``K_st y_t`` (n x C) are accumulated in float64 over blocks of the training set,
so memory is bounded by the block size whatever the training set's size. A long pass sums the training set
in chunks of whole blocks and hands the running sums (:class:`NormalEquations`) to a callback after each
chunk; given those sums back as ``start``, :func:`solve_labels` continues after the rows they cover and
returns exactly (bit for bit) what one uninterrupted pass with the same chunks returns: the chunks are the
same, and each is added to the running sums in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import scipy.linalg

from kernel_distill.errors import KernelDistillError
from kernel_distill.krr import DEFAULT_REG, cross_kernel, padded_row_blocks, ridge

if TYPE_CHECKING:
    from tqdm.auto import tqdm

DEFAULT_LS_REG = 1e-6


@dataclasses.dataclass(frozen=True)
class NormalEquations:
    """Running sums of Label Solve over the first ``count`` training rows.

    gram: float64 ``(n, n)``, ``sum_b K_sb K_bs``; projected: float64 ``(n, C)``, ``sum_b K_sb y_b``."""

    gram: np.ndarray
    projected: np.ndarray
    count: int

    @classmethod
    def zeros(cls, num_support: int, num_classes: int) -> "NormalEquations":
        return cls(np.zeros((num_support, num_support)), np.zeros((num_support, num_classes)), 0)

    def plus(self, gram: np.ndarray, projected: np.ndarray, count: int) -> "NormalEquations":
        return NormalEquations(self.gram + gram, self.projected + projected, self.count + count)


@dataclasses.dataclass(frozen=True)
class LabelSolveResult:
    labels: np.ndarray  # float32 (n, C)
    gram: np.ndarray  # float64 (n, n): K_st K_ts
    projected_targets: np.ndarray  # float64 (n, C): K_st y_t
    num_train: int


def accumulate_normal_equations(kernel_fn: Callable, x_support: np.ndarray,
                                train_blocks: Iterable[tuple[np.ndarray, np.ndarray]], get: str = "ntk",
                                progress: tqdm | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum ``K_sb K_bs`` and ``K_sb y_b`` over training blocks ``(x_b, y_b)`` (``x_b`` may carry padding
    rows past ``len(y_b)``; they are ignored).

    Returns ``(gram (n, n) float64, projected (n, C) float64, number of training points)``.
    """
    n = len(x_support)
    gram = np.zeros((n, n))
    projected = None
    count = 0
    for x_block, y_block in train_blocks:
        # (n, b); a padded block has more images than labels: its extra columns are dropped
        k_sb = np.asarray(cross_kernel(kernel_fn, x_support, x_block, get), dtype=np.float64)[:, :len(y_block)]
        gram += k_sb @ k_sb.T
        contribution = k_sb @ np.asarray(y_block, dtype=np.float64)
        projected = contribution if projected is None else projected + contribution
        count += len(y_block)
        if progress is not None:
            progress.update(1)
    if projected is None:
        raise KernelDistillError("the training set is empty")
    return gram, projected, count


def labels_from_normal_equations(k_ss: np.ndarray, gram: np.ndarray, projected: np.ndarray,
                                 reg: float = DEFAULT_REG, ls_reg: float = DEFAULT_LS_REG) -> np.ndarray:
    """``(K_ss + lam I) (gram + eps I)^-1 projected`` in float64. Returns ``(n, C)``."""
    k_ss = np.asarray(k_ss, np.float64)
    n = len(k_ss)
    lam = ridge(k_ss, reg)
    eps = ridge(gram, ls_reg)
    try:
        factor = scipy.linalg.cho_factor(gram + eps * np.eye(n), lower=True)
    except np.linalg.LinAlgError:
        raise KernelDistillError(f"K_st K_ts is singular (duplicate support images?); raise --ls-reg "
                                 f"(now {ls_reg:g})") from None
    z = scipy.linalg.cho_solve(factor, projected)
    return (k_ss + lam * np.eye(n)) @ z


# backend: a kernel_distill.distributed.Backend or None; Any, as a Backend takes a KernelFn and a Get where this
# function takes any kernel callable and a str (see kernel_distill.krr.evaluate)
def solve_labels(kernel_fn: Callable, x_support: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                 reg: float = DEFAULT_REG, ls_reg: float = DEFAULT_LS_REG, get: str = "ntk",
                 block_size: int = 5000, progress: bool = True, backend: Any = None, *,
                 chunk_blocks: int | None = None, start: NormalEquations | None = None,
                 on_chunk: Callable[[NormalEquations], None] | None = None) -> LabelSolveResult:
    """Label Solve over ``x_train`` in blocks of ``block_size``.

    ``backend``: a :class:`kernel_distill.distributed.Backend` that sums the blocks' partial sums
    (``None``: here, block after block, with a progress bar).

    Long passes: the training rows are summed in chunks of ``chunk_blocks`` blocks (``None``: one chunk),
    each added to the running sums, which go to ``on_chunk`` after every chunk (to checkpoint them).
    ``start``: running sums of an earlier pass with the same chunks; the pass continues after its
    ``start.count`` rows, which must end a chunk.

    Args:
      x_support: float ``(n, H, W, C)`` preprocessed support images.
      x_train: float ``(N, H, W, C)`` preprocessed training images (an array or a memory map: only one
        block at a time is turned into a device array).
      y_train: float ``(N, num_classes)`` centred one-hot training labels.
    """
    from tqdm.auto import tqdm

    if block_size < 1:
        raise KernelDistillError("block size must be positive")
    if chunk_blocks is not None and chunk_blocks < 1:
        raise KernelDistillError("chunk size (blocks) must be positive")
    if len(x_train) != len(y_train):
        raise KernelDistillError(f"{len(x_train)} training images but {len(y_train)} labels")
    num_rows = len(x_train)
    if num_rows == 0:
        raise KernelDistillError("the training set is empty")
    chunk_rows = num_rows if chunk_blocks is None else chunk_blocks * block_size
    sums = start if start is not None else NormalEquations.zeros(len(x_support), np.shape(y_train)[1])
    if sums.gram.shape != (len(x_support),) * 2 or sums.projected.shape != (len(x_support), np.shape(y_train)[1]):
        raise KernelDistillError(f"the saved sums are for {sums.projected.shape[0]} support images and "
                                 f"{sums.projected.shape[1]} classes, not {len(x_support)} and {np.shape(y_train)[1]}")
    if not (sums.count == num_rows or (sums.count % chunk_rows == 0 and 0 <= sums.count < num_rows)):
        raise KernelDistillError(f"the saved sums cover {sums.count} training rows, which do not end a chunk of "
                                 f"{chunk_rows} rows of {num_rows}")
    total_blocks = -(-num_rows // block_size)
    with tqdm(total=total_blocks, initial=sums.count // block_size, desc="Label Solve", unit="block",
              disable=not progress or backend is not None, leave=False) as bar:
        for first in range(sums.count, num_rows, chunk_rows):
            x_chunk, y_chunk = x_train[first:first + chunk_rows], y_train[first:first + chunk_rows]
            if backend is not None:
                gram, projected, count = backend.normal_equations(
                    kernel_fn, get, x_support, backend.put(x_chunk), backend.put(np.asarray(y_chunk, np.float64)),
                    block_size)
            else:
                blocks = _padded_blocks(x_chunk, y_chunk, min(block_size, num_rows))
                gram, projected, count = accumulate_normal_equations(kernel_fn, x_support, blocks, get, bar)
            sums = sums.plus(gram, projected, count)
            if on_chunk is not None:
                on_chunk(sums)
    k_ss = np.asarray(kernel_fn(x_support, x_support, get=get), np.float64)
    labels = labels_from_normal_equations(k_ss, sums.gram, sums.projected, reg, ls_reg)
    return LabelSolveResult(labels.astype(np.float32), sums.gram, sums.projected, sums.count)


def _padded_blocks(x: np.ndarray, y: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(x_b, y_b)`` blocks of ``size`` rows, the last padded by repeating its last image (no labels for the
    padding): every block of every chunk has one shape, so the kernel compiles once for the whole pass."""
    for offset in range(0, len(x), size):
        block = np.asarray(x[offset:offset + size])
        if len(block) < size:
            block = np.concatenate([block, np.repeat(block[-1:], size - len(block), axis=0)])
        yield block, y[offset:offset + size]


def training_objective(kernel_fn: Callable, x_support: np.ndarray, y_support: np.ndarray, x_train: np.ndarray,
                       y_train: np.ndarray, reg: float = DEFAULT_REG, get: str = "ntk",
                       block_size: int = 5000) -> float:
    """The KRR MSE ``0.5 mean((K_ts (K_ss + lam I)^-1 y_s - y_t)^2)`` over the training set, in blocks."""
    from kernel_distill.krr import solve_support

    alpha = solve_support(np.asarray(kernel_fn(x_support, x_support, get=get)), y_support, reg)
    total = 0.0
    for start, xb in padded_row_blocks(x_train, block_size):
        target = y_train[start:start + block_size]
        pred = (np.asarray(cross_kernel(kernel_fn, xb, x_support, get), np.float64) @ alpha)[:len(target)]
        total += float(np.sum((pred - target) ** 2))
    return 0.5 * total / (len(x_train) * np.asarray(y_train).shape[1])


def label_covariance(original_labels: np.ndarray, solved_labels: np.ndarray) -> np.ndarray:
    """``(C, C)`` covariance over the support between one-hot classes (rows) and solved labels (columns)."""
    a = original_labels - original_labels.mean(axis=0)
    b = solved_labels - solved_labels.mean(axis=0)
    return a.T @ b / len(a)
