"""Exact NNGP and NTK of one block of image pairs, by walking an architecture's layer tuple.

The walk is generic: it computes the input covariance, then hands the state to each layer's own rule
(:meth:`~kernel_distill.kernels.layers.Layer.kernel`, or the four statistics methods of a layer such as the
ReLU that needs per-image statistics); the static plan asks each layer which offsets it needs
(:meth:`~kernel_distill.kernels.layers.Layer.input_radius`). The band operators are in
:mod:`kernel_distill.kernels.bands`.

Conv nets: the banded representation
------------------------------------
The kernel of two images under a conv net is a covariance over pixel pairs, ``K[p, q]``. A 3x3 SAME conv
averages ``K[p + s, q + s]`` over the 9 shifts ``s``: it keeps the *offset* ``q - p``. The ReLU is
pointwise. A 2x2 average pool maps an output offset ``D`` to input offsets ``2 D + {-1, 0, 1}``. The KIP
ConvNet reads out with Flatten + Dense, which sees only equal positions (offset 0). Walking the layers
backwards from the readout therefore gives the offsets each layer needs: 0 after the last pool, 1 before
it, 3 before the one before, 7 at full resolution for three pools (``r -> 2 r + 1`` per pool, capped by
the image size). We store ``K[p, p + d]`` for ``|d| <= r`` only: an array ``(..., 2r+1, 2r+1, H, W)``,
225 offsets per pixel at 32x32 for depth 3 instead of 1,024 (and 784 at 28x28). In that layout

* a 3x3 conv is a 3x3 box filter over the positions (offsets fixed), then ``W^2 * . + b^2``;
* a 2x2 pool is four strided slices: ``K'[P, j] = (K[2P, 2j+1] + K[2P, 2j+2] + K[2P+1, 2j] +
  K[2P+1, 2j+1]) / 4`` per axis, with offsets indexed from 0 at ``-r``;
* entries whose partner position ``p + d`` lies outside the image are held at zero by a mask (the zero
  padding of the convolutions), which also makes every VALID pool and odd size exact.

The ReLU needs each pixel's variance; after a pool those depend on covariances of *different* pixels of
the same image, so each image's own banded self-covariance is propagated once (:func:`self_stats`, the
"self pass") and its per-pixel variances are reused in every block it appears in. The self pass stops at
the last ReLU, where only offset 0 is needed: radius 3 at full resolution for three pools (49 offsets
instead of 225).

All functions are pure and traceable: ``jax.jit``, ``jax.grad`` and ``jax.vjp`` work through them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernel_distill.kernels.bands import band_gather
from kernel_distill.kernels.bands import (  # noqa: F401  (their old names here, for tests and benchmarks)
    band_mask as _band_mask, box3 as _box3, box3_conv as _box3_conv, box3_slices as _box3_slices,
    center as _center, mask as _mask, pool as _pool)
from kernel_distill.kernels.layers import Step
from kernel_distill.kernels.numerics import EXACT, ZERO_NTK
from kernel_distill.kernels.spec import KernelSpec


# ----------------------------------------------------------------------------------------------------
# Static plan: spatial size and band radius before every layer.


@functools.lru_cache(maxsize=256)
def layer_plan(layers: tuple, height: int, width: int) -> tuple:
    """``((H, W, rh, rw), ...)``: the spatial size and band radius of the state *before* each layer, plus
    one entry for the output (``None`` entries once the state is flat)."""
    sizes: list[tuple[int, int] | None] = []
    shape = (height, width, 1)  # channels do not matter to the plan
    for layer in layers:
        sizes.append(shape[:2] if len(shape) == 3 else None)
        shape = layer.output_shape(shape, 1)
    sizes.append(shape[:2] if len(shape) == 3 else None)
    radii: list[tuple[int, int] | None] = [None] * len(sizes)
    rh = rw = 0
    if sizes[-1] is not None:  # a list cut after its last ReLU (the self pass) ends spatial, at offset 0
        radii[-1] = (0, 0)
    for i in range(len(layers) - 1, -1, -1):
        size = sizes[i]
        if size is None:
            continue
        rh, rw = layers[i].input_radius(rh, rw)
        h, w = size
        rh, rw = min(rh, h - 1), min(rw, w - 1)
        radii[i] = (rh, rw)
    # every spatial size has its radius (set above), so ``r is None`` only where ``s`` is
    return tuple(None if s is None or r is None else (*s, *r) for s, r in zip(sizes, radii))


def starts_flat(plan: tuple) -> bool:
    """Whether the first layer flattens (the fc nets): the walk then starts from the flat input covariance
    and skips it, instead of building a band only to read its offset 0."""
    return plan[0] is not None and plan[1] is None


def _steps(spec: KernelSpec, plan: tuple) -> tuple:
    w2, b2 = spec.W_std ** 2, spec.b_std ** 2
    return tuple(Step(plan[i], plan[i + 1], w2, b2) for i in range(len(plan) - 1))


# ----------------------------------------------------------------------------------------------------
# The walk over the layers.


def _channel_sum(products, axis: int):
    """Sum over the channel axis of the input band. A few channels (RGB) are added as separate terms: as a
    reduction, XLA's CPU backend hands the float32 product-and-sum to a library call that ran the 32x32x3
    kernel 1.5x slower than the loop it otherwise fuses into."""
    channels = products.shape[axis]
    if channels > 8:
        return jnp.sum(products, axis=axis)
    return sum(jax.lax.index_in_dim(products, c, axis, keepdims=False) for c in range(channels))


def _plan(layers: tuple, x) -> tuple:
    return layer_plan(layers, *(x.shape[1:3] if x.ndim == 4 else (1, 1)))


def partner_arrays(spec: KernelSpec, x2: jax.Array,
                   stats2: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[Any, ...]]:
    """What the blocks need of their second images, gathered into band layout once per image.

    Every pair ``(x1[a], x2[b])`` reads ``x2[b]`` and its per-pixel statistics at the partner positions
    ``p + d``; gathering those once per ``x2`` image (instead of once per pair) is a third of the conv
    kernel's time. Returns ``(input, sides)``: the flattened ``(b2, D)`` inputs or their band
    ``(b2, C, Rh, Rw, H, W)``, and per layer that needs statistics its ``partner_statistic`` (for a ReLU
    ``(std, 1/std)``, ``(b2,)`` or ``(b2, Rh, Rw, H, W)``).
    """
    plan = _plan(spec.layers, x2)
    if starts_flat(plan):
        inputs = x2.reshape(len(x2), -1)
    else:
        _, _, rh, rw = plan[0]
        inputs = band_gather(jnp.moveaxis(x2, -1, 1), rh, rw)
    with_statistics = [(layer, step) for layer, step in zip(spec.layers, _steps(spec, plan))
                       if layer.needs_statistics]
    sides = tuple(layer.partner_statistic(statistic, step)
                  for statistic, (layer, step) in zip(stats2, with_statistics))
    return inputs, sides


def _input_covariance(x1, partner, plan: tuple, same_images: bool):
    """The input layer's covariance ``x1 . x2 / D``: ``(b1, b2)`` flat, or a band of ``x1[p] . x2[p + d] / C``
    ``(b1, b2, Rh, Rw, H, W)``; with ``same_images`` (``x2 = x1``, each image with itself) the ``b2`` axis is
    absent and ``partner`` unused."""
    if starts_flat(plan):
        x1f = x1.reshape(len(x1), -1)
        if same_images:
            return jnp.sum(x1f * x1f, axis=-1) / x1f.shape[-1]
        return jnp.matmul(x1f, partner[0].T, precision=EXACT) / x1f.shape[-1]
    x1c = jnp.moveaxis(x1, -1, 1)[:, :, None, None]  # (b1, C, 1, 1, H, W)
    if same_images:
        return _channel_sum(x1c * band_gather(jnp.moveaxis(x1, -1, 1), *plan[0][2:]), axis=1) * (1.0 / x1.shape[-1])
    return _channel_sum(x1c[:, None] * partner[0][None], axis=2) * (1.0 / x1.shape[-1])


def _layer_steps(spec: KernelSpec, layers: tuple, plan: tuple) -> list:
    """``(layer, step)`` of each layer the walk applies (a flat input's first Flatten is the covariance)."""
    return list(zip(layers, _steps(spec, plan)))[1 if starts_flat(plan) else 0:]


def _propagate_self_statistics(spec: KernelSpec, x) -> tuple:
    """Each image with itself through the layers, up to the last layer that needs statistics (a ReLU: the
    rest of the walk only ever reads offset 0); returns what those layers computed, in order."""
    layers = spec.layers
    needing = [i for i, layer in enumerate(layers) if layer.needs_statistics]
    layers = layers[:needing[-1] + 1] if needing else layers[:1]
    plan = _plan(layers, x)
    k = _input_covariance(x, None, plan, same_images=True)
    statistics = []
    for layer, step in _layer_steps(spec, layers, plan):
        if layer.needs_statistics:
            statistic = layer.statistic(k, step)
            statistics.append(statistic)
            k = layer.self_kernel(k, statistic, step)
        else:
            k, _ = layer.kernel(k, None, step)
    return tuple(statistics)


def _propagate_pair(spec: KernelSpec, x1, stats1, partner, track_ntk: bool):
    """The kernel of every pair ``(x1[a], x2[b])`` through the layers, one layer rule at a time.

    ``partner = partner_arrays(spec, x2, stats2)``; returns ``(nngp, ntk)`` of shape ``(b1, b2)`` (``ntk``
    None unless ``track_ntk``)."""
    plan = _plan(spec.layers, x1)
    k = _input_covariance(x1, partner, plan, same_images=False)
    ntk = ZERO_NTK if track_ntk else None
    read = 0  # statistics of stats1 (and of the partner) consumed so far, one per layer that needs them
    for layer, step in _layer_steps(spec, spec.layers, plan):
        if layer.needs_statistics:
            k, ntk = layer.pair_kernel(k, ntk, stats1[read], partner[1][read], step)
            read += 1
        else:
            k, ntk = layer.kernel(k, ntk, step)
    return k, ntk


def self_stats(spec: KernelSpec, x: jax.Array) -> tuple[jax.Array, ...]:
    """Per-image statistics that every kernel block needs: the pre-activation variance at each ReLU (each
    layer with ``needs_statistics``, its :meth:`~kernel_distill.kernels.layers.Layer.statistic`).

    Args:
      x: ``(b, H, W, C)`` images (any ``(b, ...)`` for ``fc``), preprocessed, float32 or float64.
    Returns:
      A tuple with one array per ReLU layer: ``(b,)`` for dense layers, ``(b, H_l, W_l)`` for conv layers,
      in ``x``'s dtype. Differentiable with respect to ``x``.
    """
    return _propagate_self_statistics(spec, x)


def kernel_block_from_partner(spec: KernelSpec, x1: jax.Array, stats1: tuple[jax.Array, ...],
                              partner: tuple[jax.Array, tuple[Any, ...]], get: str = "ntk") -> jax.Array:
    """:func:`kernel_block` with the second side already gathered by :func:`partner_arrays`."""
    nngp, ntk = _propagate_pair(spec, x1, stats1, partner, track_ntk=get == "ntk")
    return ntk if get == "ntk" else nngp


def kernel_block(spec: KernelSpec, x1: jax.Array, stats1: tuple[jax.Array, ...], x2: jax.Array,
                 stats2: tuple[jax.Array, ...], get: str = "ntk") -> jax.Array:
    """The kernel between two blocks of images, from the images and their :func:`self_stats`.

    Args:
      x1: ``(b1, ...)`` and x2: ``(b2, ...)`` images; stats1/stats2: ``self_stats(spec, x1/x2)``.
      get: ``"ntk"`` or ``"nngp"``.
    Returns:
      ``(b1, b2)`` in the inputs' dtype.
    """
    return kernel_block_from_partner(spec, x1, stats1, partner_arrays(spec, x2, stats2), get)
