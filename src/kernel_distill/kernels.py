"""Infinite-width NNGP and NTK kernels of ReLU networks, computed in closed form with JAX.

Two architectures, both in the NTK parameterization (every weight ~ N(0, 1), the pre-activation scaled by
``W_std / sqrt(fan_in)``, biases ``b_std * N(0, 1)``), the convention of neural-tangents and the KIP papers:

* ``fc``: ``depth`` hidden Dense+ReLU layers, then a Dense readout.
* ``convnet``: the KIP "ConvNet": a 3x3 SAME conv + ReLU, then ``depth`` blocks of
  (3x3 SAME conv, ReLU, 2x2 average pool with stride 2, VALID), then flatten and a Dense readout.
* ``convnet3``: the same without the first conv + ReLU (only the ``depth`` blocks).

The recursions (Cho & Saul 2009; Jacot et al. 2018; Novak et al. 2019; Arora et al. 2019):

* Dense / conv layer: ``nngp' = W^2 * A(nngp) + b^2`` and ``ntk' = nngp' + W^2 * A(ntk)``, where ``A`` is
  the identity for Dense layers and, for a 3x3 convolution, the average over the 9 shifts that move both
  pixels of a pixel pair together (zero padding, normalised by the filter size 9).
* ReLU: with ``q1, q2`` the variances of the two pre-activations and ``c`` their covariance,
  ``theta = arctan2(sqrt(q1 q2 - c^2), c)``,
  ``nngp' = (sqrt(q1 q2 - c^2) + (pi - theta) c) / (2 pi)`` and ``ntk' = ntk * (pi - theta) / (2 pi)``.
* Average pool: the kernel of a pixel pair is averaged over the 2x2 x 2x2 window pairs.
* Flatten + Dense readout: the mean over pixels of the kernel of pixel pairs at the *same* position.

For a conv net the kernel between two images is a 4-D array over pixel pairs, ``(H, W, H, W)``: that is why
it costs O(pixels^2) per image pair. The ReLU needs every pixel's variance, and after an average pool those
depend on the covariance of *different* pixels of the same image, so each image's own 4-D self-covariance
is propagated once ("self pass") and its per-pixel variances are reused for every pair it appears in.

Large matrices are computed in blocks: ``(n1, n2)`` is tiled into ``(b1, b2)`` blocks with ``lax.map`` and
each block is rematerialised in the backward pass (``jax.checkpoint``), so neither the forward nor the
backward pass holds more than one block of 4-D covariances. The block size comes from a memory budget.

Everything is a pure function of arrays, so ``jax.jit``, ``jax.grad`` and ``jax.vjp`` work through it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.errors import KernelDistillError

Get = Literal["ntk", "nngp"]
# Full float32 products: on GPUs JAX's default matmul precision is TF32 (10-bit mantissa), whose 1e-3
# relative error would swamp the kernels' own accuracy.
_EXACT = jax.lax.Precision.HIGHEST
ARCHITECTURES = ("fc", "convnet", "convnet3")
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
# On a CPU, small tiles win: the 4-D arrays of a tile that fits the caches are read and written many
# times per layer, and a 28x28 ConvNet ran at 48 pairs/s with 16 MiB tiles against 20-46 pairs/s with
# 512 MiB tiles (float64 / float32, 2-core x86 machine). Accelerators want tiles as large as the budget.
CPU_TILE_BYTES = 16 * 2**20

# Live 4-D (H, W, H, W) arrays per image pair inside one conv block, forward or rematerialised backward:
# nngp, ntk, their padded/shifted copies and the ReLU temporaries. Measured with jax's memory stats on
# 28x28 inputs; a generous round number keeps the budget an upper bound.
_CONV_ARRAYS_PER_PAIR = 12
_FC_ARRAYS_PER_PAIR = 12


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Which infinite network's kernel to compute.

    Attributes:
      architecture: ``"fc"``, ``"convnet"`` (with the prepended conv + ReLU) or ``"convnet3"`` (without).
      depth: hidden Dense+ReLU layers for ``fc``; conv+ReLU+pool blocks for the conv nets. ``None`` picks
        the KIP default: 1 for ``fc``, 3 for the conv nets.
      W_std: weight standard deviation. KIP default ``sqrt(2)``.
      b_std: bias standard deviation. KIP default 0.1.
      parameterization: only ``"ntk"`` is implemented (the KIP default); ``"standard"`` is refused.
    """

    architecture: str = "fc"
    depth: int | None = None
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    parameterization: str = "ntk"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise KernelDistillError(
                f"unknown kernel architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.depth is None:
            object.__setattr__(self, "depth", 1 if self.architecture == "fc" else 3)
        if not isinstance(self.depth, (int, np.integer)) or self.depth < 0:
            raise KernelDistillError(f"kernel depth must be a non-negative integer, got {self.depth!r}")
        if self.architecture != "fc" and self.depth < 1:
            raise KernelDistillError("a conv kernel needs depth >= 1 (number of conv+pool blocks)")
        if not (np.isfinite(self.W_std) and self.W_std > 0):
            raise KernelDistillError(f"W_std must be a positive number, got {self.W_std!r}")
        if not (np.isfinite(self.b_std) and self.b_std >= 0):
            raise KernelDistillError(f"b_std must be a non-negative number, got {self.b_std!r}")
        if self.parameterization != "ntk":
            raise KernelDistillError(
                f"parameterization {self.parameterization!r} is not implemented; only 'ntk' (the KIP default)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def is_conv(self) -> bool:
        return self.architecture != "fc"

    def min_spatial_size(self) -> int:
        """Smallest image height/width the conv net accepts: each 2x2 pool halves it (VALID)."""
        return 2**self.depth if self.is_conv else 1


# ----------------------------------------------------------------------------------------------------
# Elementary pieces with safe derivatives.


@jax.custom_jvp
def _sqrt_nonneg(x, floor):
    """sqrt(max(x, 0)) whose derivative is 0 (not inf or NaN) where ``x <= floor``.

    On the diagonal K(x, x) the argument ``q1 q2 - c^2`` is zero in exact arithmetic and its derivative
    along ``x1 = x2`` is zero, but the chain rule of a plain sqrt gives 0 * inf = NaN. Compiled code also
    leaves rounding residue there (XLA contracts ``q1 q2 - c c`` into a fused multiply-add, which returns
    the product's rounding error, down to 1e-38), so the cut-off must be relative: ``floor`` is a few ulps
    of ``q1 q2``. Only the derivative is cut; the value is the exact square root.
    """
    del floor
    return jnp.sqrt(jnp.maximum(x, 0.0))


@_sqrt_nonneg.defjvp
def _sqrt_nonneg_jvp(primals, tangents):
    (x, floor), (t, _) = primals, tangents
    y = _sqrt_nonneg(x, floor)
    above = x > floor
    safe_y = jnp.where(above, y, 1.0)
    return y, jnp.where(above, t / (2.0 * safe_y), 0.0)


def _relu_kernels(cov, var1, var2, ntk):
    """Arc-cosine kernel of order 1 (ReLU) and its derivative kernel.

    Args:
      cov: covariance of the two pre-activations, any shape broadcastable with ``var1 * var2``.
      var1, var2: their variances, broadcastable to ``cov``.
      ntk: NTK entering the ReLU (same shape as ``cov``) or ``None``.
    Returns:
      ``(nngp, ntk)`` after the ReLU; ``ntk`` is ``None`` when the input was.
    """
    prod = var1 * var2
    eps = jnp.finfo(jnp.result_type(prod)).eps
    floor = 16 * eps * jax.lax.stop_gradient(prod) + jnp.finfo(jnp.result_type(prod)).tiny
    sin_part = _sqrt_nonneg(prod - cov * cov, floor)  # |x1||x2| sin(theta)
    # arctan2 has an undefined gradient at (0, 0) (a pixel with zero variance, possible with b_std = 0);
    # there the angle is irrelevant because the kernel is 0, so feed it a harmless point.
    degenerate = prod <= jnp.finfo(jnp.result_type(prod)).tiny
    theta = jnp.arctan2(jnp.where(degenerate, 0.0, sin_part), jnp.where(degenerate, 1.0, cov))
    dot_sigma = (jnp.pi - theta) / (2.0 * jnp.pi)
    nngp = sin_part / (2.0 * jnp.pi) + dot_sigma * cov
    return nngp, (None if ntk is None else ntk * dot_sigma)


_ZERO_NTK = object()  # marks the input layer's NTK (zero), so no pass is spent averaging an array of zeros


def _affine(nngp, ntk, spec: KernelSpec, spatial_average: Callable | None = None):
    """A Dense or conv layer: ``nngp' = W^2 A(nngp) + b^2``, ``ntk' = nngp' + W^2 A(ntk)``.

    ``ntk`` is ``None`` when only the NNGP is wanted, or ``_ZERO_NTK`` before the first layer.
    """
    average = spatial_average or (lambda a: a)
    w2, b2 = spec.W_std**2, spec.b_std**2
    new_nngp = w2 * average(nngp) + b2
    if ntk is None:
        return new_nngp, None
    if ntk is _ZERO_NTK:
        return new_nngp, new_nngp
    return new_nngp, new_nngp + w2 * average(ntk)


# ----------------------------------------------------------------------------------------------------
# Spatial operators on kernels over pixel pairs. Arrays end in (H, W, H', W') for pair kernels and in
# (H, W) for per-pixel variances.


def _shift_sum_pair_axis(k, axis_a: int, axis_b: int):
    """Sum over d in {-1, 0, 1} of k shifted by d along *both* axes (zero padding).

    (A version with one negative-edge ``lax.pad`` per shift, avoiding the padded copy, ran 20-30% slower
    on the CPU: XLA fuses this pad-and-slice form better.)
    """
    pad = [(0, 0)] * k.ndim
    pad[axis_a] = pad[axis_b] = (1, 1)
    padded = jnp.pad(k, pad)
    n_a, n_b = k.shape[axis_a], k.shape[axis_b]
    total = 0.0
    for offset in range(3):
        sl = [slice(None)] * k.ndim
        sl[axis_a] = slice(offset, offset + n_a)
        sl[axis_b] = slice(offset, offset + n_b)
        total = total + padded[tuple(sl)]
    return total


def _conv3x3_pairs(k):
    """3x3 SAME convolution acting on a kernel over pixel pairs, ``(..., H, W, H, W)``.

    The shift is shared by both pixels of a pair and separable in height and width, so it is two passes
    of three shifted adds instead of nine.
    """
    nd = k.ndim
    k = _shift_sum_pair_axis(k, nd - 4, nd - 2)
    k = _shift_sum_pair_axis(k, nd - 3, nd - 1)
    return k / 9.0


def _conv3x3_pixels(v):
    """3x3 SAME convolution acting on per-pixel variances, ``(..., H, W)``."""
    nd = v.ndim
    pad = [(0, 0)] * (nd - 2) + [(1, 1), (1, 1)]
    padded = jnp.pad(v, pad)
    h, w = v.shape[-2:]
    total = 0.0
    for dh in range(3):
        for dw in range(3):
            total = total + padded[..., dh:dh + h, dw:dw + w]
    return total / 9.0


def _avg_pool_pairs(k):
    """2x2 stride-2 VALID average pool on ``(..., H, W, H, W)`` -> ``(..., H//2, W//2, H//2, W//2)``."""
    *batch, h, w, h2, w2 = k.shape
    ho, wo, ho2, wo2 = h // 2, w // 2, h2 // 2, w2 // 2
    k = k[..., :2 * ho, :2 * wo, :2 * ho2, :2 * wo2]
    k = k.reshape(*batch, ho, 2, wo, 2, ho2, 2, wo2, 2)
    nb = len(batch)
    return k.mean(axis=(nb + 1, nb + 3, nb + 5, nb + 7))


def _same_pixel_mean(k):
    """Mean over pixels p of ``k[..., p, p]``: what Flatten + Dense sees. ``(..., H, W, H, W) -> (...)``."""
    *batch, h, w, _, _ = k.shape
    flat = k.reshape(*batch, h * w, h * w)
    return jnp.diagonal(flat, axis1=-2, axis2=-1).mean(axis=-1)


def _pixel_variances(k):
    """Per-pixel variances ``k[..., p, p]`` of a self-covariance, ``(..., H, W, H, W) -> (..., H, W)``."""
    *batch, h, w, _, _ = k.shape
    flat = k.reshape(*batch, h * w, h * w)
    return jnp.diagonal(flat, axis1=-2, axis2=-1).reshape(*batch, h, w)


def _conv_layer_plan(spec: KernelSpec) -> list[str]:
    plan = ["conv", "relu"] if spec.architecture == "convnet" else []
    for _ in range(spec.depth):
        plan += ["conv", "relu", "pool"]
    return plan


# ----------------------------------------------------------------------------------------------------
# Exact kernels for one block of inputs (no tiling).


def _fc_block(x1, x2, spec: KernelSpec, want_ntk: bool):
    """FC kernels of a block. ``x1: (b1, d)``, ``x2: (b2, d)`` -> ``(nngp, ntk)`` each ``(b1, b2)``."""
    d = x1.shape[-1]
    cov = jnp.matmul(x1, x2.T, precision=_EXACT) / d
    var1 = jnp.sum(x1 * x1, axis=-1) / d
    var2 = jnp.sum(x2 * x2, axis=-1) / d
    ntk = _ZERO_NTK if want_ntk else None
    for _ in range(spec.depth):
        cov, ntk = _affine(cov, ntk, spec)
        var1, _ = _affine(var1, None, spec)
        var2, _ = _affine(var2, None, spec)
        cov, ntk = _relu_kernels(cov, var1[:, None], var2[None, :], ntk)
        var1, var2 = var1 / 2.0, var2 / 2.0  # E[relu(z)^2] = var / 2
    return _affine(cov, ntk, spec)


def _patches3x3(x):
    """Zero-padded 3x3 neighbourhoods. ``(b, H, W, C) -> (b, H, W, 9 C)``."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, dh:dh + h, dw:dw + w] for dh in range(3) for dw in range(3)], axis=-1)


def _first_conv_covariance(x1, x2, subscripts: str):
    """``A(K0)``: the input covariance after the first 3x3 conv's spatial average, in one product.

    ``A(K0)[p, q] = mean over shifts d of x1[p + d] . x2[q + d] / C`` is a dot product of 3x3 patches, so
    a matmul over 9 C features replaces the input covariance and two full passes over the 4-D array.
    """
    p1 = _patches3x3(x1)
    p2 = p1 if x2 is x1 else _patches3x3(x2)
    return jnp.einsum(subscripts, p1, p2, precision=_EXACT) / p1.shape[-1]


def _conv_self_variances(x, spec: KernelSpec) -> list:
    """Per-pixel pre-activation variances at every ReLU, from each image's own 4-D self-covariance.

    Args:
      x: ``(b, H, W, C)`` images.
    Returns:
      One ``(b, H_l, W_l)`` array per ReLU layer, in order.
    """
    k = _first_conv_covariance(x, x, "bhwc,bijc->bhwij")
    variances = []
    for i, op in enumerate(_conv_layer_plan(spec)):
        if op == "conv":
            k, _ = _affine(k, None, spec, _conv3x3_pairs if i > 0 else None)
        elif op == "relu":
            v = _pixel_variances(k)
            variances.append(v)
            k, _ = _relu_kernels(k, v[..., :, :, None, None], v[..., None, None, :, :], None)
        else:
            k = _avg_pool_pairs(k)
    return variances


def _conv_block(x1, x2, variances1, variances2, spec: KernelSpec, want_ntk: bool):
    """ConvNet kernels of a block. ``x1: (b1, H, W, C)``, ``x2: (b2, H, W, C)`` -> ``(b1, b2)`` each.

    ``variances1/2`` are the outputs of :func:`_conv_self_variances` for ``x1`` and ``x2``.
    """
    k = _first_conv_covariance(x1, x2, "ahwc,bijc->abhwij")
    ntk = _ZERO_NTK if want_ntk else None
    relu_index = 0
    for i, op in enumerate(_conv_layer_plan(spec)):
        if op == "conv":
            k, ntk = _affine(k, ntk, spec, _conv3x3_pairs if i > 0 else None)
        elif op == "relu":
            v1 = variances1[relu_index][:, None, :, :, None, None]
            v2 = variances2[relu_index][None, :, None, None, :, :]
            k, ntk = _relu_kernels(k, v1, v2, ntk)
            relu_index += 1
        else:
            k = _avg_pool_pairs(k)
            ntk = None if ntk is None else _avg_pool_pairs(ntk)
    nngp = _same_pixel_mean(k)
    ntk = None if ntk is None else _same_pixel_mean(ntk)
    return _affine(nngp, ntk, spec)


# ----------------------------------------------------------------------------------------------------
# Tiling.


def _pad_rows(x, multiple: int):
    """Pad axis 0 up to a multiple by repeating the last row (never a degenerate all-zero input)."""
    n = x.shape[0]
    padded_n = -(-n // multiple) * multiple
    if padded_n == n:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], padded_n - n, axis=0)], axis=0)


def _tiled(fn, xs: Sequence, block: int):
    """Apply ``fn`` to ``block``-row chunks of every array in the pytree ``xs`` (all sharing axis 0).

    Runs the chunks one after another with ``lax.map`` and returns ``fn``'s outputs stacked back to the
    original number of rows.
    """
    leaves = jax.tree_util.tree_leaves(xs)
    n = leaves[0].shape[0]
    block = max(1, min(block, n))
    if block == n:  # one chunk: no loop, so XLA sees (and can parallelise) the whole computation
        return fn(*xs)

    def to_chunks(x):
        x = _pad_rows(x, block)
        return x.reshape(-1, block, *x.shape[1:])

    chunks = jax.tree_util.tree_map(to_chunks, tuple(xs))
    out = jax.lax.map(lambda args: fn(*args), chunks)
    return jax.tree_util.tree_map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def _balanced(n: int, at_most: int) -> int:
    """The smallest block size that covers n in as few blocks of at most ``at_most`` as possible.

    E.g. n = 2000, at_most = 1920 gives 1000 (two blocks), not 1920 (two blocks padded to 3840 rows).
    """
    at_most = max(1, min(at_most, n))
    blocks = -(-n // at_most)
    return -(-n // blocks)


def _block_sizes(n1: int, n2: int, bytes_per_pair: int, budget: int) -> tuple[int, int]:
    """A (b1, b2) tile with b1 * b2 * bytes_per_pair <= budget, as square as the inputs allow, and sized so
    that the tiles cover (n1, n2) with little padding."""
    pairs = max(1, budget // max(1, bytes_per_pair))
    b1 = _balanced(n1, max(1, int(math.isqrt(pairs))))
    b2 = _balanced(n2, max(1, pairs // b1))
    return b1, b2


@dataclasses.dataclass(frozen=True)
class KernelFn:
    """A callable ``kernel_fn(x1, x2, get="ntk") -> (n1, n2)`` for one :class:`KernelSpec`.

    Inputs are NHWC images ``(n, H, W, C)`` (any ``(n, ...)`` for ``fc``, which flattens them) in the
    preprocessed space, float32 or float64; the output has the inputs' floating dtype. Works under
    ``jax.jit`` / ``jax.grad`` / ``jax.vjp``; peak memory stays near ``memory_budget_bytes``.
    """

    spec: KernelSpec = KernelSpec()
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    tile_bytes: int | None = None  # None: CPU_TILE_BYTES on a CPU, the memory budget elsewhere

    def __call__(self, x1, x2=None, get: Get = "ntk"):
        if get not in ("ntk", "nngp"):
            raise KernelDistillError(f"get must be 'ntk' or 'nngp', got {get!r}")
        x1 = jnp.asarray(x1)
        x2 = x1 if x2 is None else jnp.asarray(x2)
        self._check_inputs(x1, x2)
        dtype = jnp.result_type(x1.dtype, x2.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.float32
        x1, x2 = x1.astype(dtype), x2.astype(dtype)
        tile = self.tile_bytes
        if tile is None:  # only the conv kernels' 4-D arrays gain from cache-sized tiles
            on_cpu = jax.default_backend() == "cpu"
            tile = CPU_TILE_BYTES if (on_cpu and self.spec.is_conv) else self.memory_budget_bytes
        return _kernel_matrix(x1, x2, self.spec, get, min(self.memory_budget_bytes, tile))

    def _check_inputs(self, x1, x2):
        for name, x in (("x1", x1), ("x2", x2)):
            if x.ndim < 2:
                raise KernelDistillError(f"{name} must have a leading batch axis, got shape {x.shape}")
            if self.spec.is_conv and x.ndim != 4:
                raise KernelDistillError(
                    f"the {self.spec.architecture} kernel needs NHWC images (n, H, W, C); {name} has shape {x.shape}")
        if x1.shape[1:] != x2.shape[1:]:
            raise KernelDistillError(f"x1 and x2 differ in shape past the batch axis: {x1.shape} vs {x2.shape}")
        if self.spec.is_conv:
            smallest = self.spec.min_spatial_size()
            if min(x1.shape[1:3]) < smallest:
                raise KernelDistillError(
                    f"{self.spec.architecture} with depth {self.spec.depth} needs images of at least "
                    f"{smallest}x{smallest} pixels (one 2x2 pool per block); got {x1.shape[1]}x{x1.shape[2]}")
        if x1.shape[0] == 0 or x2.shape[0] == 0:
            raise KernelDistillError("empty input: x1 and x2 need at least one row each")


def make_kernel_fn(spec: KernelSpec | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                   tile_bytes: int | None = None, **spec_kwargs) -> KernelFn:
    """Build ``kernel_fn(x1, x2=None, get="ntk") -> (n1, n2)`` for an architecture.

    ``memory_budget_bytes`` bounds the memory of one tile of the computation (forward or backward);
    ``tile_bytes`` caps it further for speed (default: 16 MiB on a CPU, where cache-sized tiles are
    fastest, and no cap on accelerators).

    Example::

        kernel_fn = make_kernel_fn(architecture="convnet", depth=3)
        k = kernel_fn(x_train[:10], x_test[:20], get="ntk")   # (10, 20)
    """
    if spec is None:
        spec = KernelSpec(**spec_kwargs)
    elif spec_kwargs:
        spec = dataclasses.replace(spec, **spec_kwargs)
    if memory_budget_bytes <= 0:
        raise KernelDistillError("memory_budget_bytes must be positive")
    if tile_bytes is not None and tile_bytes <= 0:
        raise KernelDistillError("tile_bytes must be positive")
    return KernelFn(spec=spec, memory_budget_bytes=int(memory_budget_bytes), tile_bytes=tile_bytes)


def _kernel_matrix(x1, x2, spec: KernelSpec, get: Get, budget: int):
    want_ntk = get == "ntk"
    itemsize = jnp.dtype(x1.dtype).itemsize
    n1, n2 = x1.shape[0], x2.shape[0]

    if not spec.is_conv:
        x1f, x2f = x1.reshape(n1, -1), x2.reshape(n2, -1)
        b1, b2 = _block_sizes(n1, n2, _FC_ARRAYS_PER_PAIR * itemsize, budget)
        if b1 >= n1 and b2 >= n2:
            return _pick(_fc_block(x1f, x2f, spec, want_ntk), get)

        block = jax.checkpoint(lambda a, b: _pick(_fc_block(a, b, spec, want_ntk), get))
        return _tile_pairs(block, (x1f,), (x2f,), b1, b2)

    h, w = x1.shape[1:3]
    pair_bytes = _CONV_ARRAYS_PER_PAIR * (h * w) ** 2 * itemsize
    b1, b2 = _block_sizes(n1, n2, pair_bytes, budget)
    self_chunk = max(1, budget // (pair_bytes // 2))
    variances = functools.partial(_conv_self_variances, spec=spec)
    var1 = _tiled(jax.checkpoint(variances), (x1,), self_chunk)
    var2 = var1 if x2 is x1 else _tiled(jax.checkpoint(variances), (x2,), self_chunk)

    def block(a, va, b, vb):
        return _pick(_conv_block(a, b, va, vb, spec, want_ntk), get)

    block = jax.checkpoint(block)
    return _tile_pairs(block, (x1, var1), (x2, var2), b1, b2)


def _tile_pairs(block_fn, rows1: tuple, rows2: tuple, b1: int, b2: int):
    """Evaluate ``block_fn(*rows1_tile, *rows2_tile) -> (b1, b2)`` over all tiles and assemble ``(n1, n2)``."""

    def row_block(*r1):
        return _tiled(lambda *r2: block_fn(*r1, *r2).T, rows2, b2).T

    return _tiled(row_block, rows1, b1)


def _pick(pair, get: Get):
    nngp, ntk = pair
    return ntk if get == "ntk" else nngp
