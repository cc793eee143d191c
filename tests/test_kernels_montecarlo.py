"""Monte-Carlo check: wide random finite networks converge to our analytic NNGP and NTK.

The finite networks are written here in plain JAX (``lax.conv_general_dilated``, matmuls), independently of
``kernel_distill.kernels``, in the NTK parameterization: every weight ~ N(0, 1), pre-activations
``W_std / sqrt(fan_in) * (x @ w) + b_std * b``.

* Empirical NNGP: a readout with ``K`` outputs; ``f f^T / K`` per network (the readout is the only layer
  whose outputs are exchangeable, the hidden layers add the O(1/sqrt(width)) network-to-network spread).
* Empirical NTK: ``J J^T`` of one output with respect to all parameters.

Statistical tolerance, stated: over ``S`` independent networks we take the mean ``m`` and its standard error
``se`` entry-wise, and require ``|m - k| <= 4 se + 0.03 sqrt(k_ii k_jj)``. The 4 standard errors cover the
sampling noise (a false alarm has probability ~1e-4 per entry under normality, and the seeds are fixed so
the test is deterministic); the 3% of the diagonal scale covers the O(1/width) finite-width bias, measured
at under 2% for these widths. A negative control checks that the same samples *reject* a slightly wrong
kernel (W_std 5% too large), so the test can fail.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill.kernels import make_kernel_fn

W_STD, B_STD = math.sqrt(2.0), 0.1


def _dense(h, w, b, w_std=W_STD):
    return w_std * h @ w / math.sqrt(w.shape[0]) + B_STD * b


def _fc_init(key, d_in, width, depth, n_out):
    dims = [d_in] + [width] * depth + [n_out]
    params = []
    for i in range(depth + 1):
        key, kw, kb = jax.random.split(key, 3)
        params.append((jax.random.normal(kw, (dims[i], dims[i + 1])), jax.random.normal(kb, (dims[i + 1],))))
    return params


def _fc_apply(params, x):
    h = x.reshape(len(x), -1)
    for w, b in params[:-1]:
        h = jax.nn.relu(_dense(h, w, b))
    return _dense(h, *params[-1])


def _convnet_init(key, c_in, width, n_convs, n_out):
    convs = []
    for _ in range(n_convs):
        key, kw, kb = jax.random.split(key, 3)
        convs.append((jax.random.normal(kw, (3, 3, c_in, width)), jax.random.normal(kb, (width,))))
        c_in = width
    key, kw, kb = jax.random.split(key, 3)
    return convs, (kw, kb, n_out)


def _convnet_apply(params, x, prepend: bool):
    convs, readout = params
    h = x
    for i, (w, b) in enumerate(convs):
        fan_in = w.shape[0] * w.shape[1] * w.shape[2]
        z = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(W_STD * z / math.sqrt(fan_in) + B_STD * b)
        if not (prepend and i == 0):
            n, height, width, c = h.shape
            h = h[:, : height // 2 * 2, : width // 2 * 2]
            h = h.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))
    h = h.reshape(len(h), -1)
    w, b = readout
    return _dense(h, w, b)


def _materialise_readout(params, d):
    """The conv readout's shape depends on the flattened size, known only after a forward pass."""
    convs, (kw, kb, n_out) = params
    return convs, (jax.random.normal(kw, (d, n_out)), jax.random.normal(kb, (n_out,)))


def _empirical_kernels(apply, init, x, num_networks, nngp_outputs=256):
    """Returns ``(nngp_samples, ntk_samples)``, each ``(num_networks, n, n)`` float64 numpy."""

    @jax.jit
    def one(key):
        k_nngp, k_ntk = jax.random.split(key)
        f = apply(init(k_nngp, nngp_outputs), x)
        nngp = f @ f.T / f.shape[1]
        params = init(k_ntk, 1)
        jac = jax.jacrev(lambda p: apply(p, x)[:, 0])(params)
        flat = jnp.concatenate([j.reshape(len(x), -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
        return nngp, flat @ flat.T

    samples = [one(jax.random.PRNGKey(seed)) for seed in range(num_networks)]
    return tuple(np.stack([np.asarray(s[i]) for s in samples]) for i in range(2))


def _within_tolerance(samples, analytic) -> bool:
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0, ddof=1) / math.sqrt(len(samples))
    diag = np.diag(analytic)
    scale = np.sqrt(np.outer(diag, diag))
    return bool(np.all(np.abs(mean - analytic) <= 4 * standard_error + 0.03 * scale))


@pytest.fixture
def inputs():
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 2))
    x[3] = 0.5 * x[0]  # a scaled copy: angle zero, the ReLU kernel's boundary
    return x


def _check(apply, init, x, architecture, depth, num_networks):
    nngp_samples, ntk_samples = _empirical_kernels(apply, init, x, num_networks)
    kernel_fn = make_kernel_fn(architecture=architecture, depth=depth)
    wrong_fn = make_kernel_fn(architecture=architecture, depth=depth, W_std=1.05 * W_STD)
    for get, samples in (("nngp", nngp_samples), ("ntk", ntk_samples)):
        analytic = np.asarray(kernel_fn(x, x, get=get))
        assert _within_tolerance(samples, analytic), f"{get}: Monte-Carlo mean disagrees with the analytic kernel"
        assert not _within_tolerance(samples, np.asarray(wrong_fn(x, x, get=get))), \
            f"{get}: the test cannot tell a 5% error in W_std"


@pytest.mark.parametrize("depth", [1, 3])
def test_fc_converges_to_analytic(x64, inputs, depth):
    d = int(np.prod(inputs.shape[1:]))
    init = lambda key, n_out: _fc_init(key, d, 1024, depth, n_out)  # noqa: E731
    _check(_fc_apply, init, inputs, "fc", depth, num_networks=20)


@pytest.mark.slow
def test_convnet_converges_to_analytic(x64, inputs):
    width, prepend = 512, True
    flat_dim = width  # 8x8 inputs, three 2x2 pools -> 1x1 pixels

    def init(key, n_out):
        return _materialise_readout(_convnet_init(key, inputs.shape[-1], width, 4, n_out), flat_dim)

    apply = lambda p, x: _convnet_apply(p, x, prepend)  # noqa: E731
    _check(apply, init, inputs, "convnet", 3, num_networks=12)
