"""Monte-Carlo check: wide random finite networks converge to our analytic NNGP and NTK.

The finite networks are :class:`kernel_distill.finite.LayerNet`, built from each registered architecture's
layer list (the same list the exact kernel walks), in the NTK parameterization: every weight ~ N(0, 1),
pre-activations ``W_std / sqrt(fan_in) * (x @ w) + b_std * b``. They share no code with the kernel
recursions (flax convolutions and matmuls against covariance algebra), so agreement tests both.

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

from kernel_distill.finite import LayerNet
from kernel_distill.kernels import ARCHITECTURES, KernelSpec, make_kernel_fn


def _empirical_kernels(spec: KernelSpec, width: int, x, num_networks, nngp_outputs=256):
    """Returns ``(nngp_samples, ntk_samples)``, each ``(num_networks, n, n)`` float64 numpy.

    The networks run in float32, as users train them: its rounding (~1e-6 relative) is far below the
    tolerance, and float64 convolutions were 5x slower per network (jaxlib 0.10 with the package's XLA flag,
    ``kernel_distill._xla_workarounds``: 12.6 s against 1.5 s for one convnet3 sample, 2 cores shared with two
    other jobs, 2026-12-07; the suite's slowest test took 842 s)."""
    x = jnp.asarray(x, jnp.float32)

    def net(n_out):
        return LayerNet(spec.layers, n_out, width, "ntk", spec.W_std, spec.b_std)

    wide, single = net(nngp_outputs), net(1)

    @jax.jit
    def one(key):
        k_nngp, k_ntk = jax.random.split(key)
        f = wide.apply(wide.init(k_nngp, x), x)
        nngp = f @ f.T / f.shape[1]
        params = single.init(k_ntk, x)
        jac = jax.jacrev(lambda p: single.apply(p, x)[:, 0])(params)
        flat = jnp.concatenate([j.reshape(len(x), -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
        return nngp, flat @ flat.T

    samples = [one(jax.random.PRNGKey(seed)) for seed in range(num_networks)]
    return tuple(np.stack([np.asarray(s[i], np.float64) for s in samples]) for i in range(2))


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


def _check(spec: KernelSpec, width: int, x, num_networks):
    nngp_samples, ntk_samples = _empirical_kernels(spec, width, jnp.asarray(x), num_networks)
    kernel_fn = make_kernel_fn(spec)
    wrong_fn = make_kernel_fn(spec, W_std=1.05 * spec.W_std)
    # all four matrices in one program: XLA shares each kernel's NNGP walk inside its NTK's (one compilation
    # instead of four; for the conv nets compiling is most of the analytic side's time)
    kernels = jax.jit(lambda z: {(fn, get): f(z, z, get=get) for fn, f in (("right", kernel_fn), ("wrong", wrong_fn))
                                 for get in ("nngp", "ntk")})(jnp.asarray(x))
    for get, samples in (("nngp", nngp_samples), ("ntk", ntk_samples)):
        analytic = np.asarray(kernels["right", get])
        assert _within_tolerance(samples, analytic), f"{get}: Monte-Carlo mean disagrees with the analytic kernel"
        assert not _within_tolerance(samples, np.asarray(kernels["wrong", get])), \
            f"{get}: the test cannot tell a 5% error in W_std"


def test_every_registered_architecture_has_a_monte_carlo_case():
    covered = {"fc", "convnet", "convnet3"}
    assert set(ARCHITECTURES) <= covered, f"add a Monte-Carlo case for {set(ARCHITECTURES) - covered}"


@pytest.mark.parametrize("depth", [1, 3])
def test_fc_converges_to_analytic(x64, inputs, depth):
    _check(KernelSpec("fc", depth), 1024, inputs, num_networks=20)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["convnet", "convnet3"])
def test_convnet_converges_to_analytic(x64, inputs, architecture):
    _check(KernelSpec(architecture, 3), 512, inputs, num_networks=12)
