"""The elementwise pieces of the kernel recursions (kernels/numerics.py), against numpy closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill.kernels import numerics


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stored_once_returns_its_argument_bit_for_bit(x64, dtype, rng):
    tiny = np.finfo(dtype).tiny
    # magnitudes from just above sqrt(tiny) to 1, and the ReLU angle term's own range [0, 1/2]
    exponents = rng.uniform(np.log10(np.sqrt(tiny)) + 1, 0, 2000)
    x = np.concatenate([10.0 ** exponents, rng.uniform(0, 0.5, 2000)]).astype(dtype)
    got = np.asarray(jax.jit(numerics.stored_once)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, x)
    # below sqrt(tiny) (the exact zeros of the angle term) it returns sqrt(tiny): 1e-154 in float64
    zero = float(jax.jit(numerics.stored_once)(jnp.zeros((), dtype)))
    assert 0 < zero <= 1.01 * np.sqrt(tiny)


def test_stored_once_has_the_identity_derivative(x64, rng):
    x = jnp.asarray(rng.uniform(0, 0.5, 50))
    weights = jnp.asarray(rng.standard_normal(50))
    grad = jax.grad(lambda z: jnp.sum(numerics.stored_once(z) * weights))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))
    assert float(jax.grad(lambda z: numerics.stored_once(z))(0.0)) == 1.0  # no inf or NaN at zero


def _relu_closed_form(cov, q1, q2, ntk):
    """Cho & Saul's arc-cosine kernel of order 1 with numpy's arccos."""
    rho = np.clip(cov / np.sqrt(q1 * q2), -1, 1)
    theta = np.arccos(rho)
    nngp = (np.sqrt(q1 * q2) * np.sin(theta) + (np.pi - theta) * cov) / (2 * np.pi)
    return nngp, ntk * (np.pi - theta) / (2 * np.pi)


@pytest.mark.parametrize("store_angle", [False, True])
def test_relu_kernels_match_the_arccos_closed_form(x64, store_angle, rng):
    n = 4000
    q1, q2 = rng.uniform(0.1, 3, n), rng.uniform(0.1, 3, n)
    rho = np.concatenate([rng.uniform(-1, 1, n - 4), [-1.0, 1.0, 0.0, 1 - 1e-12]])
    cov, ntk = rho * np.sqrt(q1 * q2), rng.uniform(0, 2, n)
    std1, std2 = np.sqrt(q1), np.sqrt(q2)
    fn = jax.jit(lambda *a: numerics.relu_kernels(*a, store_angle=store_angle))
    nngp, ntk_out = fn(*(jnp.asarray(a) for a in (cov, std1, 1 / std1, std2, 1 / std2, ntk)))
    want_nngp, want_ntk = _relu_closed_form(cov, q1, q2, ntk)
    # sin(arccos(rho)) near |rho| = 1 loses digits in numpy's own evaluation, hence atol at 1e-7 of the scale
    np.testing.assert_allclose(np.asarray(nngp), want_nngp, rtol=1e-12, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ntk_out), want_ntk, rtol=1e-12, atol=1e-12)


def test_storing_the_angle_changes_neither_values_nor_gradients(x64, rng):
    n = 500
    q1, q2 = rng.uniform(0.1, 3, n), rng.uniform(0.1, 3, n)
    cov = rng.uniform(-0.99, 0.99, n) * np.sqrt(q1 * q2)
    args = [jnp.asarray(a) for a in (cov, np.sqrt(q1), 1 / np.sqrt(q1), np.sqrt(q2), 1 / np.sqrt(q2),
                                     rng.uniform(0, 2, n))]

    def loss(store, c, ntk):
        nngp, ntk_out = numerics.relu_kernels(c, *args[1:5], ntk, store_angle=store)
        return jnp.sum(jnp.sin(nngp) + ntk_out ** 2)

    for store in (False, True):
        value, grads = jax.jit(jax.value_and_grad(lambda c, t: loss(store, c, t), argnums=(0, 1)))(args[0], args[5])
        if store:
            np.testing.assert_allclose(float(value), reference[0], rtol=1e-14)
            for g, want in zip(grads, reference[1]):
                np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-13, atol=1e-15)
        else:
            reference = (float(value), grads)


@pytest.mark.parametrize("dtype, ulps", [("float64", 1.0), ("float32", 2.0)])
def test_asin_polynomial_is_accurate_to_an_ulp(x64, dtype, ulps):
    a = np.linspace(0, 1 / np.sqrt(2), 100001)
    got = np.asarray(jax.jit(numerics._asin_small)(jnp.asarray(a, dtype))).astype(np.longdouble)
    want = np.arcsin(a.astype(dtype).astype(np.longdouble))
    relative = np.abs(got - want) / np.maximum(want, np.finfo(dtype).tiny)
    assert float(relative.max()) <= ulps * np.finfo(dtype).eps
