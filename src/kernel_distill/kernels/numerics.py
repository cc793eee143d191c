"""Elementwise pieces of the kernel recursions, with derivatives that stay finite where the maths is singular.

* :func:`affine`: a Dense or conv layer, ``nngp' = W^2 A(nngp) + b^2``, ``ntk' = nngp' + W^2 A(ntk)``.
* :func:`relu_kernels`: the arc-cosine kernel of order 1 (ReLU) and its derivative kernel (Cho & Saul 2009):
  with ``q1, q2`` the variances of two pre-activations and ``c`` their covariance,
  ``theta = arccos(c / sqrt(q1 q2))``, ``nngp' = (sqrt(q1 q2 - c^2) + (pi - theta) c) / (2 pi)`` and
  ``ntk' = ntk * (pi - theta) / (2 pi)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jax.typing import ArrayLike

# Full float32 products: on GPUs JAX's default matmul precision is TF32 (10-bit mantissa), whose 1e-3
# relative error would swamp the kernels' own accuracy.
EXACT = jax.lax.Precision.HIGHEST


class _ZeroNtk:
    """Marks the input layer's NTK (zero), so no pass is spent averaging an array of zeros."""

    def __repr__(self):
        return "ZERO_NTK"


ZERO_NTK = _ZeroNtk()
if TYPE_CHECKING:
    # The NTK a kernel step carries: an array, None (only the NNGP is wanted) or ZERO_NTK (no affine layer yet).
    Ntk = jax.Array | _ZeroNtk | None
_INV_TWO_PI = 1.0 / (2.0 * np.pi)


@jax.custom_jvp
def sqrt_nonneg(x: jax.Array, floor: ArrayLike) -> jax.Array:
    """sqrt(max(x, 0)) whose derivative is 0 (not inf or NaN) where ``x <= floor``.

    On the diagonal K(x, x) the argument ``q1 q2 - c^2`` is zero in exact arithmetic and its derivative
    along ``x1 = x2`` is zero, but the chain rule of a plain sqrt gives 0 * inf = NaN. Compiled code also
    leaves rounding residue there (XLA contracts ``q1 q2 - c c`` into a fused multiply-add, which returns
    the product's rounding error, down to 1e-38), so the cut-off must be relative: ``floor`` is a few ulps
    of ``q1 q2``. Below it the value is cut to 0 as well (see below), consistent with the zero derivative.
    """
    # At and next to the diagonal the argument is rounding residue whose size depends on how XLA compiled
    # the tile (a fused multiply-add or not), and its square root turns an ulp into 1e-8 of the kernel: the
    # same pair gave values 1e-9 apart in two tilings. Below ``floor`` the value is therefore 0 too, which
    # moves it by at most sqrt(floor) (the size of that rounding noise) and makes it the same in every tiling.
    return jnp.where(x > floor, jnp.sqrt(jnp.maximum(x, 0.0)), 0.0)


@sqrt_nonneg.defjvp
def _sqrt_nonneg_jvp(primals, tangents):
    (x, floor), (t, _) = primals, tangents
    y = sqrt_nonneg(x, floor)
    above = x > floor
    safe_y = jnp.where(above, y, 1.0)
    return y, jnp.where(above, t / (2.0 * safe_y), 0.0)


@functools.lru_cache(maxsize=None)
def _asin_correction_coefficients(degree: int) -> tuple:
    """Monomial coefficients of ``g(u) = (asin(sqrt u) / sqrt u - 1) / u`` on ``u in [0, 1/2]``.

    A Chebyshev fit of degree 18 reproduces ``asin(a) = a + a u g(u)`` (``u = a^2``, ``a <= 1/sqrt 2``)
    to 2.2e-16 relative (one float64 ulp); degree 8 to 1e-9, past float32's resolution. The reference
    values are computed in extended precision.
    """
    from numpy.polynomial import chebyshev, polynomial

    ext = np.longdouble
    t = np.cos(np.pi * (np.arange(200) + 0.5) / 200)
    u = (t.astype(ext) + 1) / 4
    a = np.sqrt(u)
    g = (np.arcsin(a) / a - 1) / u
    cheb = chebyshev.chebfit(t, g.astype(np.float64), degree)
    in_t = chebyshev.cheb2poly(cheb).astype(ext)
    in_u = np.zeros(degree + 1, ext)  # substitute t = 4 u - 1
    for k, c in enumerate(in_t):
        in_u[:k + 1] += c * polynomial.polypow(np.array([-1, 4], ext), k)[:k + 1]
    return tuple(float(c) for c in in_u)


def _asin_small(a):
    """``asin(a)`` for ``0 <= a <= 1/sqrt(2)`` with multiplies and adds only (vectorises; XLA's float64
    ``atan2`` was 60% of the ConvNet kernel's time on a CPU)."""
    degree = 18 if jnp.result_type(a) == jnp.float64 else 8
    u = a * a
    # Estrin's scheme: pairs of terms, then pairs of pairs, with u, u^2, u^4, ...: a dependency chain of
    # log2(degree) multiply-adds instead of Horner's ``degree``, so the CPU overlaps more of them.
    terms, power = list(_asin_correction_coefficients(degree)), u
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] * power if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
        power = power * power
    return a + a * u * terms[0]


def std_and_inverse(variance: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(v), 1 / sqrt(v))`` per position, both 0 where ``v`` is 0 (a zero-padded or dead position)."""
    tiny = jnp.finfo(jnp.result_type(variance)).tiny
    alive = variance > tiny
    std = jnp.sqrt(jnp.where(alive, variance, 1.0))
    return jnp.where(alive, std, 0.0), jnp.where(alive, 1.0 / std, 0.0)


def relu_kernels(cov: jax.Array, std1: jax.Array, inv1: jax.Array, std2: jax.Array, inv2: jax.Array,
                 ntk: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Arc-cosine kernel of order 1 (ReLU) and its derivative kernel.

    Args:
      cov: covariance of the two pre-activations.
      std1, inv1, std2, inv2: their standard deviations and inverses (:func:`std_and_inverse`),
        broadcastable to ``cov``; zero (a zero-padded position) gives a zero kernel.
      ntk: NTK entering the ReLU (same shape as ``cov``) or ``None``.
    Returns:
      ``(nngp, ntk)`` after the ReLU; ``ntk`` is ``None`` when the input was.

    With ``rho = cos(theta)`` and ``s = sin(theta)``, the angle comes from ``asin`` of the smaller of
    ``|rho|`` and ``s`` (at most 1/sqrt 2, where a polynomial is exact to an ulp), by symmetry.
    """
    eps = jnp.finfo(jnp.result_type(cov)).eps
    rho = jnp.clip(cov * inv1 * inv2, -1.0, 1.0)
    s = sqrt_nonneg((1.0 - rho) * (1.0 + rho), 16 * eps)  # sin(theta)
    abs_rho = jnp.abs(rho)
    alpha = _asin_small(jnp.minimum(s, abs_rho))
    half_pi = 0.5 * jnp.pi
    theta = jnp.where(abs_rho <= s, half_pi - jnp.where(rho < 0, -alpha, alpha),
                      jnp.where(rho > 0, alpha, jnp.pi - alpha))
    # Multiplications by 1 / (2 pi), not divisions: a vector division costs as much as 20 multiply-adds.
    dot_sigma = (jnp.pi - theta) * _INV_TWO_PI
    nngp = (std1 * std2) * s * _INV_TWO_PI + dot_sigma * cov
    return nngp, (None if ntk is None else ntk * dot_sigma)


def affine(nngp: jax.Array, ntk: Ntk, w2: float, b2: float, spatial_average: Callable | None = None,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """A Dense or conv layer: ``nngp' = W^2 A(nngp) + b^2``, ``ntk' = nngp' + W^2 A(ntk)``.

    ``ntk`` is ``None`` when only the NNGP is wanted, or :data:`ZERO_NTK` before the first layer.
    ``mask`` (broadcastable, 0/1) zeroes entries that stand for positions outside the image.
    """
    average = spatial_average or (lambda a: a)
    masked = (lambda a: a) if mask is None else (lambda a: a * mask)
    new_nngp = masked(w2 * average(nngp) + b2)
    if ntk is None:
        return new_nngp, None
    if ntk is ZERO_NTK:
        return new_nngp, new_nngp
    return new_nngp, new_nngp + masked(w2 * average(ntk))
