"""Linear operators on band arrays: the banded representation of a conv net's pixel-pair covariances.

A band array ends in ``(2rh+1, 2rw+1, H, W)``: ``K[..., i, j, p, q]`` is the covariance of position ``(p, q)``
with its partner ``(p + i - rh, q + j - rw)``, offsets first and positions last (rows of contiguous positions
make the gathers and the 3x3 sums plain shifted copies). Entries whose partner lies outside the image are
held at zero by :func:`mask` (the zero padding of the convolutions). The layers' exact kernel rules
(:mod:`kernel_distill.kernels.layers`) are written with these; docs/KERNELS.md derives them.

All functions are pure and traceable; the box filter and the pool carry hand-written VJPs (their adjoints).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.kernels.numerics import EXACT

if TYPE_CHECKING:
    from jax.typing import DTypeLike


@functools.lru_cache(maxsize=256)
def band_mask(h: int, w: int, rh: int, rw: int) -> np.ndarray:
    """``(2rh+1, 2rw+1, H, W)``: 1 where the partner position ``p + d`` lies inside the image."""
    ph = np.arange(-rh, rh + 1)[:, None] + np.arange(h)[None, :]
    pw = np.arange(-rw, rw + 1)[:, None] + np.arange(w)[None, :]
    inside_h = (ph >= 0) & (ph < h)
    inside_w = (pw >= 0) & (pw < w)
    return (inside_h[:, None, :, None] & inside_w[None, :, None, :]).astype(np.float64)


def mask(h: int, w: int, rh: int, rw: int, dtype: DTypeLike) -> jax.Array:
    """:func:`band_mask` as a JAX array of ``dtype``."""
    return jnp.asarray(band_mask(h, w, rh, rw), dtype)


def band_gather(v: jax.Array, rh: int, rw: int) -> jax.Array:
    """``out[..., i, j, p, q] = v[..., p + i - rh, q + j - rw]`` (0 outside). ``(..., H, W) -> (..., 2rh+1, 2rw+1, H, W)``."""
    h, w = v.shape[-2:]
    pad = [(0, 0)] * (v.ndim - 2) + [(rh, rh), (rw, rw)]
    padded = jnp.pad(v, pad)
    rows = jnp.stack([padded[..., i:i + h, :] for i in range(2 * rh + 1)], axis=-3)  # (..., Rh, H, W+2rw)
    return jnp.stack([rows[..., j:j + w] for j in range(2 * rw + 1)], axis=-3)  # (..., Rh, Rw, H, W)


# returns an Array; Any, as builtins.sum types the sum of the (never empty) slices as possibly the int 0
def box3_slices(k: jax.Array) -> Any:
    """The 3x3 average as one padded copy and nine shifted slices, summed in one fused pass."""
    h, w = k.shape[-2:]
    padded = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(1, 1), (1, 1)])
    return sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) * (1.0 / 9.0)


def box3_conv(k: jax.Array) -> jax.Array:
    """The 3x3 average as a one-channel convolution, every offset of every pair an image of the batch."""
    h, w = k.shape[-2:]
    weights = jnp.full((1, 1, 3, 3), 1.0 / 9.0, k.dtype)
    out = jax.lax.conv_general_dilated(k.reshape(-1, 1, h, w), weights, (1, 1), [(1, 1), (1, 1)],
                                       precision=EXACT)
    return out.reshape(k.shape)


@jax.custom_vjp
def box3(k: jax.Array) -> jax.Array:
    """3x3 SAME average over the position axes of a band array (zero padding); offsets unchanged.

    On a CPU it is a convolution: XLA does not fuse a convolution with its producers, so what feeds the
    filter (the input band, the ReLU's outputs) is computed once and stored. Written as nine slices of a
    padded copy, XLA folds the centre slice back into the unpadded producer and recomputes that producer in
    every consumer loop: the ReLU's asin polynomial seven times per band entry for the two the maths needs,
    and a 3-channel input band re-read from memory six times per pair. The convolution runs the CPU kernel
    2.7-9.1x faster (docs/KERNELS.md). Accelerators keep the slices, fused into one pass with their
    producers: that is what the H100 tables measured.

    The filter is its own adjoint (a symmetric stencil with zero padding), so its VJP is the same operation
    on the cotangent.
    """
    return box3_conv(k) if jax.default_backend() == "cpu" else box3_slices(k)


box3.defvjp(lambda k: (box3(k), None), lambda _, g: (box3(g),))


def _resize_offsets(k, axis: int, radius: int):
    """Crop or zero-pad a band array's offset axis symmetrically to ``2 radius + 1`` entries."""
    current = (k.shape[axis] - 1) // 2
    if current > radius:
        return jax.lax.slice_in_dim(k, current - radius, current + radius + 1, axis=axis)
    if current < radius:
        pad = [(0, 0)] * k.ndim
        pad[axis] = (radius - current, radius - current)
        return jnp.pad(k, pad)
    return k


def _pool_axis(k, pos_axis: int, off_axis: int, out_radius: int):
    """2x2/stride-2 VALID average along one spatial axis of a band array (half of the 2-D pool)."""
    return _pool_axis_core(_resize_offsets(k, off_axis, 2 * out_radius + 1), pos_axis, off_axis, k.shape[pos_axis])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pool_axis_core(k, pos_axis: int, off_axis: int, n_in: int):
    """:func:`_pool_axis` of a band array whose offset axis is already ``2 (2 r_out + 1) + 1`` long;
    ``n_in = k.shape[pos_axis]`` (static, for the VJP)."""
    n_out = k.shape[pos_axis] // 2
    r_out = (k.shape[off_axis] - 1) // 2
    even = jax.lax.slice_in_dim(k, 0, 2 * n_out, stride=2, axis=pos_axis)
    odd = jax.lax.slice_in_dim(k, 1, 2 * n_out, stride=2, axis=pos_axis)

    def offsets(a, start):
        return jax.lax.slice_in_dim(a, start, start + 2 * r_out - 1, stride=2, axis=off_axis)

    return (offsets(even, 1) + offsets(even, 2) + offsets(odd, 0) + offsets(odd, 1)) / 4.0


def _pool_axis_core_fwd(k, pos_axis, off_axis, n_in):
    return _pool_axis_core(k, pos_axis, off_axis, n_in), None


def _pool_axis_core_bwd(pos_axis, off_axis, n_in, _, g):
    """The pool's adjoint written as one interleaving pass: an even input row ``2P`` receives ``g[P, j] / 4``
    at offsets ``2j + 1`` and ``2j + 2``, an odd row ``2P + 1`` at ``2j`` and ``2j + 1``. With autodiff's four
    strided scatters instead, the whole 28x28 float64 kernel VJP took 1.5x as long on a CPU."""
    g = g / 4.0
    twice = jnp.repeat(g, 2, axis=off_axis)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(g, 0, 1, axis=off_axis))
    even = jnp.concatenate([zero, twice], axis=off_axis)
    odd = jnp.concatenate([twice, zero], axis=off_axis)
    rows = jnp.stack([even, odd], axis=pos_axis + 1)
    shape = list(even.shape)
    shape[pos_axis] *= 2
    grad = rows.reshape(shape)
    if n_in > shape[pos_axis]:  # an odd size: VALID pooling drops the last row
        pad = [(0, 0)] * grad.ndim
        pad[pos_axis] = (0, n_in - shape[pos_axis])
        grad = jnp.pad(grad, pad)
    return (grad,)


_pool_axis_core.defvjp(_pool_axis_core_fwd, _pool_axis_core_bwd)


def pool(k: jax.Array, out_plan: tuple[int, int, int, int]) -> jax.Array:
    """2x2/stride-2 VALID average pool of a band array; ``out_plan = (H', W', rh', rw')`` of the result.
    ``(..., Rh, Rw, H, W) -> (..., 2rh'+1, 2rw'+1, H', W')``."""
    h, w, rh, rw = out_plan
    nd = k.ndim
    k = _pool_axis(k, nd - 2, nd - 4, rh)
    k = _pool_axis(k, nd - 1, nd - 3, rw)
    return k * mask(h, w, rh, rw, k.dtype)


def center(k: jax.Array) -> jax.Array:
    """The offset-0 entries of a band array: ``(..., Rh, Rw, H, W) -> (..., H, W)``."""
    rh, rw = (k.shape[-4] - 1) // 2, (k.shape[-3] - 1) // 2
    return k[..., rh, rw, :, :]
