"""Exact NNGP and NTK of one block of image pairs, by walking an architecture's layer list.

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

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.kernels.numerics import EXACT, ZERO_NTK, affine, relu_kernels, std_and_inverse
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
    if sizes[-1] is not None:  # a list cut after its last ReLU (the self pass) ends spatial, at offset 0
        radii[-1] = (0, 0)
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
    """``(2rh+1, 2rw+1, H, W)``: 1 where the partner position ``p + d`` lies inside the image."""
    ph = np.arange(-rh, rh + 1)[:, None] + np.arange(h)[None, :]
    pw = np.arange(-rw, rw + 1)[:, None] + np.arange(w)[None, :]
    inside_h = (ph >= 0) & (ph < h)
    inside_w = (pw >= 0) & (pw < w)
    return (inside_h[:, None, :, None] & inside_w[None, :, None, :]).astype(np.float64)


def _mask(h, w, rh, rw, dtype):
    return jnp.asarray(_band_mask(h, w, rh, rw), dtype)


# ----------------------------------------------------------------------------------------------------
# Banded spatial operators. A band array ends in (2rh+1, 2rw+1, H, W): offsets, then positions (rows of
# contiguous positions make the gathers and the 3x3 sums plain shifted copies).


def band_gather(v, rh: int, rw: int):
    """``out[..., i, j, p, q] = v[..., p + i - rh, q + j - rw]`` (0 outside). ``(..., H, W) -> (..., 2rh+1, 2rw+1, H, W)``."""
    h, w = v.shape[-2:]
    pad = [(0, 0)] * (v.ndim - 2) + [(rh, rh), (rw, rw)]
    padded = jnp.pad(v, pad)
    rows = jnp.stack([padded[..., i:i + h, :] for i in range(2 * rh + 1)], axis=-3)  # (..., Rh, H, W+2rw)
    return jnp.stack([rows[..., j:j + w] for j in range(2 * rw + 1)], axis=-3)  # (..., Rh, Rw, H, W)


def _box3_slices(k):
    """The 3x3 average as one padded copy and nine shifted slices, summed in one fused pass."""
    h, w = k.shape[-2:]
    padded = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(1, 1), (1, 1)])
    return sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) * (1.0 / 9.0)


def _box3_conv(k):
    """The 3x3 average as a one-channel convolution, every offset of every pair an image of the batch."""
    h, w = k.shape[-2:]
    weights = jnp.full((1, 1, 3, 3), 1.0 / 9.0, k.dtype)
    out = jax.lax.conv_general_dilated(k.reshape(-1, 1, h, w), weights, (1, 1), [(1, 1), (1, 1)],
                                       precision=EXACT)
    return out.reshape(k.shape)


@jax.custom_vjp
def _box3(k):
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
    return _box3_conv(k) if jax.default_backend() == "cpu" else _box3_slices(k)


_box3.defvjp(lambda k: (_box3(k), None), lambda _, g: (_box3(g),))


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


def _pool(k, out_plan):
    h, w, rh, rw = out_plan
    nd = k.ndim
    k = _pool_axis(k, nd - 2, nd - 4, rh)
    k = _pool_axis(k, nd - 1, nd - 3, rw)
    return k * _mask(h, w, rh, rw, k.dtype)


def _center(k):
    """The offset-0 entries of a band array: ``(..., Rh, Rw, H, W) -> (..., H, W)``."""
    rh, rw = (k.shape[-4] - 1) // 2, (k.shape[-3] - 1) // 2
    return k[..., rh, rw, :, :]


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


def _plan(spec: KernelSpec, x) -> tuple:
    return layer_plan(spec.layers, *(x.shape[1:3] if x.ndim == 4 else (1, 1)))


def _starts_flat(spec: KernelSpec) -> bool:
    return isinstance(spec.layers[0], Flatten)


def partner_arrays(spec: KernelSpec, x2, stats2):
    """What the blocks need of their second images, gathered into band layout once per image.

    Every pair ``(x1[a], x2[b])`` reads ``x2[b]`` and its per-pixel statistics at the partner positions
    ``p + d``; gathering those once per ``x2`` image (instead of once per pair) is a third of the conv
    kernel's time. Returns ``(input, relu_sides)``: the flattened ``(b2, D)`` inputs or their band
    ``(b2, C, Rh, Rw, H, W)``, and per ReLU ``(std, 1/std)``, ``(b2,)`` or ``(b2, Rh, Rw, H, W)``.
    """
    plan = _plan(spec, x2)
    if _starts_flat(spec):
        inputs = x2.reshape(len(x2), -1)
    else:
        _, _, rh, rw = plan[0]
        inputs = band_gather(jnp.moveaxis(x2, -1, 1), rh, rw)
    sides = []
    relu_plans = [plan[i] for i, layer in enumerate(spec.layers) if isinstance(layer, Relu)]
    for variance, here in zip(stats2, relu_plans):
        std, inv = std_and_inverse(variance)
        if here is not None:
            std, inv = band_gather(std, *here[2:]), band_gather(inv, *here[2:])
        sides.append((std, inv))
    return inputs, tuple(sides)


def _walk(spec: KernelSpec, x1, stats1, partner, want_ntk: bool, self_mode: bool):
    """Propagate the kernel through ``spec.layers``.

    Pair mode: ``partner = partner_arrays(spec, x2, stats2)``; returns ``(nngp, ntk)`` of shape
    ``(b1, b2)`` (``ntk`` None unless wanted).
    Self mode (``stats1``, ``partner`` unused): returns the per-ReLU variances, a tuple of ``(b,)``
    (flat) or ``(b, H_l, W_l)`` (spatial) arrays, the statistics every pair block needs.
    """
    layers = spec.layers
    if self_mode:  # only the variances at the ReLUs are wanted: stop at the last one, whose band is offset 0
        relus = [i for i, layer in enumerate(layers) if isinstance(layer, Relu)]
        layers = layers[:relus[-1] + 1] if relus else layers[:1]
    plan = layer_plan(layers, *(x1.shape[1:3] if x1.ndim == 4 else (1, 1)))
    w2, b2 = spec.W_std ** 2, spec.b_std ** 2
    flat = _starts_flat(spec)
    if flat:
        x1f = x1.reshape(len(x1), -1)
        if self_mode:
            k = jnp.sum(x1f * x1f, axis=-1) / x1f.shape[-1]
        else:
            k = jnp.matmul(x1f, partner[0].T, precision=EXACT) / x1f.shape[-1]
    else:  # a band of x1[p] . x2[p + d] / C
        x1c = jnp.moveaxis(x1, -1, 1)[:, :, None, None]  # (b1, C, 1, 1, H, W)
        if self_mode:
            k = _channel_sum(x1c * band_gather(jnp.moveaxis(x1, -1, 1), *plan[0][2:]), axis=1) * (1.0 / x1.shape[-1])
        else:
            k = _channel_sum(x1c[:, None] * partner[0][None], axis=2) * (1.0 / x1.shape[-1])
    ntk = ZERO_NTK if (want_ntk and not self_mode) else None
    variances = []
    relu_index = 0
    for i in range(1 if flat else 0, len(layers)):
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
                std, inv = std_and_inverse(v)
                side1 = (std[..., None, None, :, :], inv[..., None, None, :, :])
                side2 = (band_gather(std, *here[2:]), band_gather(inv, *here[2:]))
            else:
                std1, inv1 = std_and_inverse(stats1[relu_index])
                std2, inv2 = partner[1][relu_index]
                if spatial:
                    side1 = (std1[:, None, None, None], inv1[:, None, None, None])
                else:
                    side1 = (std1[:, None], inv1[:, None])
                side2 = (std2[None], inv2[None])
            k, ntk = relu_kernels(k, *side1, *side2, ntk)
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
    return _walk(spec, x, None, None, False, True)


def kernel_block_from_partner(spec: KernelSpec, x1, stats1, partner, get: str = "ntk"):
    """:func:`kernel_block` with the second side already gathered by :func:`partner_arrays`."""
    nngp, ntk = _walk(spec, x1, stats1, partner, get == "ntk", False)
    return ntk if get == "ntk" else nngp


def kernel_block(spec: KernelSpec, x1, stats1, x2, stats2, get: str = "ntk"):
    """The kernel between two blocks of images, from the images and their :func:`self_stats`.

    Args:
      x1: ``(b1, ...)`` and x2: ``(b2, ...)`` images; stats1/stats2: ``self_stats(spec, x1/x2)``.
      get: ``"ntk"`` or ``"nngp"``.
    Returns:
      ``(b1, b2)`` in the inputs' dtype.
    """
    return kernel_block_from_partner(spec, x1, stats1, partner_arrays(spec, x2, stats2), get)
