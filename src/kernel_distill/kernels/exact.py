"""Exact NNGP and NTK of one block of image pairs, by walking an architecture's layer list.

Conv nets: the banded representation
------------------------------------
The kernel of two images under a conv net is a covariance over pixel pairs, ``K[p, q]``. A 3x3 SAME conv
averages ``K[p + s, q + s]`` over the 9 shifts ``s``: it keeps the *offset* ``q - p``. The ReLU is
pointwise. A 2x2 average pool maps an output offset ``D`` to input offsets ``2 D + {-1, 0, 1}``. The KIP
ConvNet reads out with Flatten + Dense, which sees only equal positions (offset 0). Walking the layers
backwards from the readout therefore gives the offsets each layer needs: 0 after the last pool, 1 before
it, 3 before the one before, 7 at full resolution for three pools (``r -> 2 r + 1`` per pool, capped by
the image size). We store ``K[p, p + d]`` for ``|d| <= r`` only: an array ``(..., H, W, 2r+1, 2r+1)``,
225 offsets per pixel at 32x32 for depth 3 instead of 1,024 (and 784 at 28x28). In that layout

* a 3x3 conv is a 3x3 box filter over the positions (offsets fixed), then ``W^2 * . + b^2``;
* a 2x2 pool is four strided slices: ``K'[P, j] = (K[2P, 2j+1] + K[2P, 2j+2] + K[2P+1, 2j] +
  K[2P+1, 2j+1]) / 4`` per axis, with offsets indexed from 0 at ``-r``;
* entries whose partner position ``p + d`` lies outside the image are held at zero by a mask (the zero
  padding of the convolutions), which also makes every VALID pool and odd size exact.

The ReLU needs each pixel's variance; after a pool those depend on covariances of *different* pixels of
the same image, so each image's own banded self-covariance is propagated once (:func:`self_stats`, the
"self pass") and its per-pixel variances are reused in every block it appears in.

All functions are pure and traceable: ``jax.jit``, ``jax.grad`` and ``jax.vjp`` work through them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.kernels import numerics
from kernel_distill.kernels.numerics import EXACT, ZERO_NTK, affine, relu_kernels
from kernel_distill.kernels.spec import AvgPool, Conv, Dense, Flatten, KernelSpec, Relu


# ----------------------------------------------------------------------------------------------------
# Static plan: spatial size and band radius before every layer.


@functools.lru_cache(maxsize=256)
def layer_plan(layers: tuple, height: int, width: int) -> tuple:
    """``((H, W, rh, rw), ...)``: the spatial size and band radius of the state *before* each layer, plus
    one entry for the output (``None`` entries once the state is flat)."""
    sizes = []
    h, w, flat = height, width, False
    for layer in layers:
        sizes.append(None if flat else (h, w))
        if isinstance(layer, AvgPool):
            h, w = h // 2, w // 2
        elif isinstance(layer, Flatten):
            flat = True
    sizes.append(None if flat else (h, w))
    radii = [None] * len(sizes)
    rh = rw = 0
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if sizes[i] is None:
            continue
        if isinstance(layer, AvgPool):
            rh, rw = 2 * rh + 1, 2 * rw + 1
        elif isinstance(layer, Flatten):
            rh = rw = 0
        h, w = sizes[i]
        rh, rw = min(rh, h - 1), min(rw, w - 1)
        radii[i] = (rh, rw)
    return tuple(None if s is None else (*s, *r) for s, r in zip(sizes, radii))


@functools.lru_cache(maxsize=256)
def _band_mask(h: int, w: int, rh: int, rw: int) -> np.ndarray:
    """``(H, W, 2rh+1, 2rw+1)``: 1 where the partner position ``p + d`` lies inside the image."""
    ph = np.arange(h)[:, None] + np.arange(-rh, rh + 1)[None, :]
    pw = np.arange(w)[:, None] + np.arange(-rw, rw + 1)[None, :]
    inside_h = (ph >= 0) & (ph < h)
    inside_w = (pw >= 0) & (pw < w)
    return (inside_h[:, None, :, None] & inside_w[None, :, None, :]).astype(np.float64)


def _mask(h, w, rh, rw, dtype):
    return jnp.asarray(_band_mask(h, w, rh, rw), dtype)


# ----------------------------------------------------------------------------------------------------
# Banded spatial operators. A band array ends in (H, W, 2rh+1, 2rw+1).


def band_gather(v, rh: int, rw: int):
    """``out[..., p, q, i, j] = v[..., p + i - rh, q + j - rw]`` (0 outside). ``(..., H, W) -> (..., H, W, 2rh+1, 2rw+1)``."""
    h, w = v.shape[-2:]
    pad = [(0, 0)] * (v.ndim - 2) + [(rh, rh), (rw, rw)]
    padded = jnp.pad(v, pad)
    rows = jnp.stack([padded[..., i:i + h, :] for i in range(2 * rh + 1)], axis=-1)  # (..., H, W+2rw, Rh)
    return jnp.stack([rows[..., :, j:j + w, :] for j in range(2 * rw + 1)], axis=-1)  # (..., H, W, Rh, Rw)


def _box3(k):
    """3x3 SAME average over the position axes of a band array (zero padding); offsets unchanged."""
    nd = k.ndim
    for axis in (nd - 4, nd - 3):
        n = k.shape[axis]
        pad = [(0, 0)] * nd
        pad[axis] = (1, 1)
        padded = jnp.pad(k, pad)
        k = sum(jax.lax.slice_in_dim(padded, s, s + n, axis=axis) for s in range(3))
    return k / 9.0


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
    k = _resize_offsets(k, off_axis, 2 * out_radius + 1)
    n_out = k.shape[pos_axis] // 2
    r_out = 2 * out_radius + 1
    even = jax.lax.slice_in_dim(k, 0, 2 * n_out, stride=2, axis=pos_axis)
    odd = jax.lax.slice_in_dim(k, 1, 2 * n_out, stride=2, axis=pos_axis)

    def offsets(a, start):
        return jax.lax.slice_in_dim(a, start, start + 2 * r_out - 1, stride=2, axis=off_axis)

    return (offsets(even, 1) + offsets(even, 2) + offsets(odd, 0) + offsets(odd, 1)) / 4.0


def _pool(k, out_plan):
    h, w, rh, rw = out_plan
    nd = k.ndim
    k = _pool_axis(k, nd - 4, nd - 2, rh)
    k = _pool_axis(k, nd - 3, nd - 1, rw)
    return k * _mask(h, w, rh, rw, k.dtype)


def _center(k):
    """The offset-0 entries of a band array: ``(..., H, W, Rh, Rw) -> (..., H, W)``."""
    rh, rw = (k.shape[-2] - 1) // 2, (k.shape[-1] - 1) // 2
    return k[..., rh, rw]


# ----------------------------------------------------------------------------------------------------
# The walk over the layers.


def _input_covariance(x1, x2, plan0, flat: bool, self_mode: bool):
    """Covariance of the raw inputs, divided by the fan-in of the first affine layer.

    Flat: ``(b1, b2)`` (``(b,)`` in self mode). Spatial: a band ``(b1, b2, H, W, Rh, Rw)`` of
    ``x1[p] . x2[p + d] / C`` (``(b, H, W, Rh, Rw)`` in self mode).
    """
    if flat:
        x1f = x1.reshape(len(x1), -1)
        d = x1f.shape[-1]
        if self_mode:
            return jnp.sum(x1f * x1f, axis=-1) / d
        x2f = x2.reshape(len(x2), -1)
        return jnp.matmul(x1f, x2f.T, precision=EXACT) / d
    _, _, rh, rw = plan0
    c = x1.shape[-1]
    other = x1 if self_mode else x2
    band = band_gather(jnp.moveaxis(other, -1, 1), rh, rw)  # (b2, C, H, W, Rh, Rw)
    x1c = jnp.moveaxis(x1, -1, 1)[..., None, None]  # (b1, C, H, W, 1, 1)
    if self_mode:
        return jnp.sum(x1c * band, axis=1) / c
    return jnp.sum(x1c[:, None] * band[None], axis=2) / c


def _walk(spec: KernelSpec, x1, x2, stats1, stats2, want_ntk: bool, self_mode: bool):
    """Propagate the kernel through ``spec.layers``.

    Pair mode: returns ``(nngp, ntk)`` of shape ``(b1, b2)`` (``ntk`` None unless wanted).
    Self mode (``x2``, ``stats*`` unused): returns the per-ReLU variances, a tuple of ``(b,)`` (flat) or
    ``(b, H_l, W_l)`` (spatial) arrays, the statistics every pair block needs.
    """
    layers = spec.layers
    plan = layer_plan(layers, *(x1.shape[1:3] if x1.ndim == 4 else (1, 1)))
    w2, b2 = spec.W_std ** 2, spec.b_std ** 2
    flat = isinstance(layers[0], Flatten)
    k = _input_covariance(x1, x2, plan[0], flat, self_mode)
    ntk = ZERO_NTK if (want_ntk and not self_mode) else None
    variances = []
    relu_index = 0
    start = 1 if flat else 0
    for i in range(start, len(layers)):
        layer, here = layers[i], plan[i]
        if isinstance(layer, Dense):
            k, ntk = affine(k, ntk, w2, b2)
        elif isinstance(layer, Conv):
            h, w, rh, rw = here
            k, ntk = affine(k, ntk, w2, b2, _box3, _mask(h, w, rh, rw, k.dtype))
        elif isinstance(layer, Relu):
            spatial = here is not None
            if self_mode:
                v = _center(k) if spatial else k
                variances.append(v)
                if not spatial:  # E[relu(z)^2] = var / 2, exactly
                    k = k / 2.0
                    continue
                var1 = v[..., None, None]
                var2 = band_gather(v, *here[2:])
            elif spatial:
                var1 = stats1[relu_index][:, None, :, :, None, None]
                var2 = band_gather(stats2[relu_index], *here[2:])[None]
            else:
                var1, var2 = stats1[relu_index][:, None], stats2[relu_index][None, :]
            k, ntk = relu_kernels(k, var1, var2, ntk)
            relu_index += 1
        elif isinstance(layer, AvgPool):
            k = _pool(k, plan[i + 1])
            ntk = None if ntk is None else _pool(ntk, plan[i + 1])
        elif isinstance(layer, Flatten):
            k = jnp.mean(_center(k), axis=(-2, -1))
            ntk = None if ntk is None else jnp.mean(_center(ntk), axis=(-2, -1))
    if self_mode:
        return tuple(variances)
    return k, ntk


def self_stats(spec: KernelSpec, x):
    """Per-image statistics that every kernel block needs: the pre-activation variance at each ReLU.

    Args:
      x: ``(b, H, W, C)`` images (any ``(b, ...)`` for ``fc``), preprocessed, float32 or float64.
    Returns:
      A tuple with one array per ReLU layer: ``(b,)`` for dense layers, ``(b, H_l, W_l)`` for conv layers,
      in ``x``'s dtype. Differentiable with respect to ``x``.
    """
    return _walk(spec, x, None, None, None, False, True)


def kernel_block(spec: KernelSpec, x1, stats1, x2, stats2, get: str = "ntk"):
    """The kernel between two blocks of images, from the images and their :func:`self_stats`.

    Args:
      x1: ``(b1, ...)`` and x2: ``(b2, ...)`` images; stats1/stats2: ``self_stats(spec, x1/x2)``.
      get: ``"ntk"`` or ``"nngp"``.
    Returns:
      ``(b1, b2)`` in the inputs' dtype.
    """
    nngp, ntk = _walk(spec, x1, x2, stats1, stats2, get == "ntk", False)
    return ntk if get == "ntk" else nngp
