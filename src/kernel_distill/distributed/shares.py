"""The work of one share, as pure jitted JAX functions: what a worker computes for its part of a step.

The kernel blocks of a support and a target batch (a KIP step's) split into shares ``w = 0 .. W-1``:
share ``w`` owns a contiguous chunk of the target batch (rows of ``K_ts``) and a contiguous range of support
rows (rows of ``K_ss``). The driver needs only the concatenated blocks forward and the sum of the shares'
cotangents backward, so the result does not depend on how the work is split (up to floating-point
summation order). Every function computes in the dtype of its inputs; callers cast first (:func:`as_dtype`),
so no process-wide switch decides a worker's precision.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill import kernels
from kernel_distill.kernels import KernelFn
from kernel_distill.kernels.api import Get

if TYPE_CHECKING:
    import numpy.typing as npt

    class Rows(Protocol):
        """What the blocks are sliced from: an array, or a view whose slices are arrays (a worker's cast rows)."""

        def __len__(self) -> int: ...

        def __getitem__(self, item: slice, /) -> Any: ...


def as_dtype(x: npt.ArrayLike, dtype: npt.DTypeLike) -> np.ndarray:
    """``x`` as a host array of ``dtype`` (no copy when it already is one)."""
    return np.asarray(x, dtype=dtype)


def _stats(kernel_fn: KernelFn, x):
    return kernels.tiled_self_stats(kernel_fn.spec, x, kernel_fn.tile_budget())


def _rows(tree, rows: tuple[int, int]):
    return jax.tree_util.tree_map(lambda a: a[rows[0]:rows[1]], tree)


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get", "rows"))
def forward_share(kernel_fn: KernelFn, get: Get, rows: tuple[int, int], x_t: jax.Array,
                  x_s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One share's kernel blocks: ``K(x_t, x_s)`` ``(m_w, n)`` and ``K(x_s[rows], x_s)`` ``(r_w, n)``."""
    spec, budget = kernel_fn.spec, kernel_fn.tile_budget()
    stats_s = _stats(kernel_fn, x_s)
    n = x_s.shape[0]
    if x_t.shape[0]:
        k_ts = kernels.kernel_matrix_from_stats(spec, x_t, _stats(kernel_fn, x_t), x_s, stats_s, get, budget)
    else:
        k_ts = jnp.zeros((0, n), x_s.dtype)
    if rows[1] > rows[0]:
        k_rs = kernels.kernel_matrix_from_stats(spec, x_s[rows[0]:rows[1]], _rows(stats_s, rows), x_s, stats_s,
                                                get, budget)
    else:
        k_rs = jnp.zeros((0, n), x_s.dtype)
    return k_ts, k_rs


@functools.partial(jax.jit, static_argnames=("kernel_fn", "get", "rows"))
def backward_share(kernel_fn: KernelFn, get: Get, rows: tuple[int, int], x_t: jax.Array, x_s: jax.Array,
                   d_kts: jax.Array, g_rows: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One share's block VJPs, summed onto the support.

    Args:
      d_kts: ``(m_w, n)`` cotangent of this share's ``K_ts`` rows.
      g_rows: ``(r_w, n)`` rows ``rows`` of ``G + G^T``, ``G = dL/dK_ss`` (``K_ss`` is symmetric, so its
        gradient through both arguments is the gradient through the first with ``G + G^T``).
    Returns:
      ``(dx_s (n, ...), dstats_s)``: this share's part of the support images' cotangent through the blocks,
      and of the support statistics' cotangent (the driver adds the statistics' VJP once, after the sum).
    """
    spec, budget = kernel_fn.spec, kernel_fn.tile_budget()
    stats_s = _stats(kernel_fn, x_s)
    dx = jnp.zeros_like(x_s)
    dstats = jax.tree_util.tree_map(jnp.zeros_like, stats_s)
    if x_t.shape[0]:
        _, _, dx_ts, ds_ts = kernels.kernel_matrix_vjp(spec, x_t, _stats(kernel_fn, x_t), x_s, stats_s, d_kts, get,
                                                       budget, wrt=(False, True))
        dx = dx + dx_ts
        dstats = jax.tree_util.tree_map(jnp.add, dstats, ds_ts)
    if rows[1] > rows[0]:
        dx_r, ds_r, _, _ = kernels.kernel_matrix_vjp(spec, x_s[rows[0]:rows[1]], _rows(stats_s, rows), x_s, stats_s,
                                                     g_rows, get, budget, wrt=(True, False))
        dx = dx.at[rows[0]:rows[1]].add(dx_r)
        dstats = jax.tree_util.tree_map(lambda a, b: a.at[rows[0]:rows[1]].add(b), dstats, ds_r)
    return dx, dstats


@functools.partial(jax.jit, static_argnames=("kernel_fn",))
def support_stats_vjp(kernel_fn: KernelFn, x_s: jax.Array, dstats: Sequence[jax.Array]) -> jax.Array:
    """The support images' cotangent through their own statistics (added once, after summing the shares)."""
    return kernels.tiled_self_stats_vjp(kernel_fn.spec, x_s, dstats, kernel_fn.tile_budget())


def normal_equation_share(kernel_fn: KernelFn, get: Get, x_support: np.ndarray, x: Rows, y: np.ndarray,
                          starts: Iterable[int], block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``sum_b K_sb K_bs`` and ``sum_b K_sb y_b`` over the blocks of ``x`` starting at ``starts``.

    Blocks are padded to ``block_size`` rows (one compiled shape); padded columns are dropped.
    Returns ``(gram (n, n) float64, projected (n, C) float64, count)``.
    """
    n = len(x_support)
    gram, projected, count = np.zeros((n, n)), np.zeros((n, np.shape(y)[1])), 0
    cross = kernel_fn.jitted(get)
    for start in starts:
        xb, yb = padded_block(x, start, block_size), np.asarray(y[start:start + block_size], np.float64)
        k_sb = np.asarray(cross(x_support, xb), np.float64)[:, :len(yb)]
        gram += k_sb @ k_sb.T
        projected += k_sb @ yb
        count += len(yb)
    return gram, projected, count


def prediction_share(kernel_fn: KernelFn, get: Get, x_support: np.ndarray, alpha: np.ndarray, x: Rows,
                     starts: Iterable[int], block_size: int) -> np.ndarray:
    """KRR predictions ``K(x_b, x_support) @ alpha`` (float64) of the blocks of ``x`` at ``starts``, stacked."""
    cross = kernel_fn.jitted(get)
    out = []
    for start in starts:
        rows = min(block_size, len(x) - start)
        k = np.asarray(cross(padded_block(x, start, block_size), x_support), np.float64)[:rows]
        out.append(k @ alpha)
    return np.concatenate(out) if out else np.zeros((0, np.shape(alpha)[1]))


def padded_block(x: Rows, start: int, block_size: int) -> np.ndarray:
    """Rows ``start:start + block_size`` of ``x``, the last block padded by repeating its last row."""
    block_size = min(block_size, max(1, len(x)))
    block = np.asarray(x[start:start + block_size])
    missing = block_size - len(block)
    if missing:
        block = np.concatenate([block, np.repeat(block[-1:], missing, axis=0)])
    return block


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0..n``, sizes differing by at most one (some may be empty)."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
