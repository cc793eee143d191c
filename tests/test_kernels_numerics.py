"""The elementwise pieces of the kernel recursions (kernels/numerics.py), against numpy closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill.kernels import numerics


def _relu_closed_form(cov, q1, q2, ntk):
    """Cho & Saul's arc-cosine kernel of order 1 with numpy's arccos."""
    rho = np.clip(cov / np.sqrt(q1 * q2), -1, 1)
    theta = np.arccos(rho)
    nngp = (np.sqrt(q1 * q2) * np.sin(theta) + (np.pi - theta) * cov) / (2 * np.pi)
    return nngp, ntk * (np.pi - theta) / (2 * np.pi)


def test_relu_kernels_match_the_arccos_closed_form(x64, rng):
    n = 4000
    q1, q2 = rng.uniform(0.1, 3, n), rng.uniform(0.1, 3, n)
    rho = np.concatenate([rng.uniform(-1, 1, n - 4), [-1.0, 1.0, 0.0, 1 - 1e-12]])
    cov, ntk = rho * np.sqrt(q1 * q2), rng.uniform(0, 2, n)
    std1, std2 = np.sqrt(q1), np.sqrt(q2)
    fn = jax.jit(numerics.relu_kernels)
    nngp, ntk_out = fn(*(jnp.asarray(a) for a in (cov, std1, 1 / std1, std2, 1 / std2, ntk)))
    want_nngp, want_ntk = _relu_closed_form(cov, q1, q2, ntk)
    # sin(arccos(rho)) near |rho| = 1 loses digits in numpy's own evaluation, hence atol at 1e-7 of the scale
    np.testing.assert_allclose(np.asarray(nngp), want_nngp, rtol=1e-12, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ntk_out), want_ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, ulps", [("float64", 1.0), ("float32", 2.0)])
def test_asin_polynomial_is_accurate_to_an_ulp(x64, dtype, ulps):
    a = np.linspace(0, 1 / np.sqrt(2), 100001)
    got = np.asarray(jax.jit(numerics._asin_small)(jnp.asarray(a, dtype))).astype(np.longdouble)
    want = np.arcsin(a.astype(dtype).astype(np.longdouble))
    relative = np.abs(got - want) / np.maximum(want, np.finfo(dtype).tiny)
    assert float(relative.max()) <= ulps * np.finfo(dtype).eps
