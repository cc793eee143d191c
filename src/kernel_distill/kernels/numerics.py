"""Elementwise pieces of the kernel recursions, with derivatives that stay finite where the maths is singular.

* :func:`affine`: a Dense or conv layer, ``nngp' = W^2 A(nngp) + b^2``, ``ntk' = nngp' + W^2 A(ntk)``.
* :func:`relu_kernels`: the arc-cosine kernel of order 1 (ReLU) and its derivative kernel (Cho & Saul 2009):
  with ``q1, q2`` the variances of two pre-activations and ``c`` their covariance,
  ``theta = arccos(c / sqrt(q1 q2))``, ``nngp' = (sqrt(q1 q2 - c^2) + (pi - theta) c) / (2 pi)`` and
  ``ntk' = ntk * (pi - theta) / (2 pi)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Full float32 products: on GPUs JAX's default matmul precision is TF32 (10-bit mantissa), whose 1e-3
# relative error would swamp the kernels' own accuracy.
EXACT = jax.lax.Precision.HIGHEST


class _ZeroNtk:
    """Marks the input layer's NTK (zero), so no pass is spent averaging an array of zeros."""

    def __repr__(self):
        return "ZERO_NTK"


ZERO_NTK = _ZeroNtk()


@jax.custom_jvp
def sqrt_nonneg(x, floor):
    """sqrt(max(x, 0)) whose derivative is 0 (not inf or NaN) where ``x <= floor``.

    On the diagonal K(x, x) the argument ``q1 q2 - c^2`` is zero in exact arithmetic and its derivative
    along ``x1 = x2`` is zero, but the chain rule of a plain sqrt gives 0 * inf = NaN. Compiled code also
    leaves rounding residue there (XLA contracts ``q1 q2 - c c`` into a fused multiply-add, which returns
    the product's rounding error, down to 1e-38), so the cut-off must be relative: ``floor`` is a few ulps
    of ``q1 q2``. Only the derivative is cut; the value is the exact square root.
    """
    del floor
    return jnp.sqrt(jnp.maximum(x, 0.0))


@sqrt_nonneg.defjvp
def _sqrt_nonneg_jvp(primals, tangents):
    (x, floor), (t, _) = primals, tangents
    y = sqrt_nonneg(x, floor)
    above = x > floor
    safe_y = jnp.where(above, y, 1.0)
    return y, jnp.where(above, t / (2.0 * safe_y), 0.0)


def relu_kernels(cov, var1, var2, ntk):
    """Arc-cosine kernel of order 1 (ReLU) and its derivative kernel.

    Args:
      cov: covariance of the two pre-activations, any shape broadcastable with ``var1 * var2``.
      var1, var2: their variances, broadcastable to ``cov``; zero variance (a zero-padded position, or a
        pixel of a net without biases) gives a zero kernel.
      ntk: NTK entering the ReLU (same shape as ``cov``) or ``None``.
    Returns:
      ``(nngp, ntk)`` after the ReLU; ``ntk`` is ``None`` when the input was.
    """
    prod = var1 * var2
    tiny = jnp.finfo(jnp.result_type(prod)).tiny
    eps = jnp.finfo(jnp.result_type(prod)).eps
    floor = 16 * eps * jax.lax.stop_gradient(prod) + tiny
    sin_part = sqrt_nonneg(prod - cov * cov, floor)  # |x1||x2| sin(theta)
    # arctan2 has an undefined gradient at (0, 0) (a pixel with zero variance, possible with b_std = 0);
    # there the angle is irrelevant because the kernel is 0, so feed it a harmless point.
    degenerate = prod <= tiny
    theta = jnp.arctan2(jnp.where(degenerate, 0.0, sin_part), jnp.where(degenerate, 1.0, cov))
    dot_sigma = (jnp.pi - theta) / (2.0 * jnp.pi)
    nngp = sin_part / (2.0 * jnp.pi) + dot_sigma * cov
    return nngp, (None if ntk is None else ntk * dot_sigma)


def affine(nngp, ntk, w2: float, b2: float, spatial_average: Callable | None = None, mask=None):
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
