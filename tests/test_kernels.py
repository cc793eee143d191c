"""Kernels: exact agreement with neural-tangents 0.6.5 goldens, finite gradients, bounded memory, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelSpec, make_kernel_fn

from conftest import GOLDENS

GOLDEN_FILES = sorted(GOLDENS.glob("*.npz"))


def _load_golden(path):
    with np.load(path) as g:
        return {k: g[k] for k in g.files}


def test_goldens_cover_every_architecture():
    specs = [json.loads(str(_load_golden(p)["spec"])) for p in GOLDEN_FILES]
    assert {s["architecture"] for s in specs} == {"fc", "convnet", "convnet3"}


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("memory_budget_bytes", [512 * 2**20, 1], ids=["one-block", "one-pair-blocks"])
def test_matches_neural_tangents_float64(x64, path, memory_budget_bytes):
    g = _load_golden(path)
    kernel_fn = make_kernel_fn(KernelSpec.from_dict(json.loads(str(g["spec"]))),
                               memory_budget_bytes=memory_budget_bytes)

    # The four matrices in one program: XLA shares the NNGP walk inside the NTK's and the self statistics,
    # which compiles a conv golden in about 60% of the time of four separate calls (most of this test's time).
    @jax.jit
    def all_four(x1, x2):
        return {f"{get}_{pair}": kernel_fn(x1, x2 if pair == "12" else None, get=get)
                for get in ("nngp", "ntk") for pair in ("12", "11")}

    for name, matrix in all_four(g["x1"], g["x2"]).items():
        assert matrix.dtype == np.float64
        np.testing.assert_allclose(np.asarray(matrix), g[name], rtol=1e-5, atol=0, err_msg=name)


@pytest.mark.parametrize("path", GOLDEN_FILES[:1] + [p for p in GOLDEN_FILES if "convnet_depth3_8x8" in p.name],
                         ids=lambda p: p.stem)
def test_float32_is_the_default_and_close(path):
    g = _load_golden(path)
    kernel_fn = make_kernel_fn(KernelSpec.from_dict(json.loads(str(g["spec"]))))
    out = kernel_fn(g["x1"].astype(np.float32), g["x2"].astype(np.float32), get="ntk")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), g["ntk_12"], rtol=2e-4)


@pytest.mark.parametrize("architecture", ["fc", "convnet", "convnet3"])
def test_symmetry_and_blocking_agree(architecture, rng):
    x1 = rng.standard_normal((5, 8, 8, 2)).astype(np.float32)
    x2 = rng.standard_normal((3, 8, 8, 2)).astype(np.float32)
    whole = make_kernel_fn(architecture=architecture, depth=2)
    tiled = make_kernel_fn(architecture=architecture, depth=2, memory_budget_bytes=1)
    # one program (one compilation) for the three matrices
    k12, k21, k12_tiled = map(np.asarray, jax.jit(lambda a, b: (whole(a, b), whole(b, a), tiled(a, b)))(x1, x2))
    np.testing.assert_allclose(k21, k12.T, rtol=1e-5)
    np.testing.assert_allclose(k12_tiled, k12, rtol=1e-5)


@pytest.mark.parametrize("architecture,b_std", [("fc", 0.1), ("fc", 0.0), ("convnet", 0.1), ("convnet3", 0.0)])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gradients_are_finite_on_the_diagonal(architecture, b_std, get, rng):
    """K(x, x) sits on the arccos/sqrt boundary; KIP differentiates through it with respect to x."""
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    x[2] = 2.0 * x[0]  # same direction: angle 0 off the diagonal too
    kernel_fn = make_kernel_fn(architecture=architecture, depth=2, b_std=b_std)
    weights = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)

    def own(z):
        return jnp.sum(weights * kernel_fn(z, get=get))

    def cross(z1, z2):
        return jnp.sum(weights * kernel_fn(z1, z2, get=get))

    # jitted together: one compilation (sharing the forward walk) instead of one per primitive eagerly
    g_own, (g1, g2) = jax.jit(lambda z: (jax.grad(own)(z), jax.grad(cross, argnums=(0, 1))(z, z)))(x)
    for g in (g_own, g1, g2):
        assert np.all(np.isfinite(np.asarray(g)))
    # Differentiating K(x, x) through one argument or both must agree with the chain rule.
    np.testing.assert_allclose(np.asarray(g_own), np.asarray(g1 + g2), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("architecture", ["fc", "convnet"])
def test_gradients_match_finite_differences(x64, architecture, rng):
    x1 = rng.standard_normal((2, 8, 8, 1))
    x2 = rng.standard_normal((3, 8, 8, 1))
    kernel_fn = make_kernel_fn(architecture=architecture, depth=2, memory_budget_bytes=1)
    check_grads(lambda a, b: kernel_fn(a, b, get="ntk"), (x1, x2), order=1, modes=("rev",), eps=1e-4,
                atol=1e-6, rtol=1e-5)


def test_large_convnet_matrix_stays_within_its_memory_budget():
    """A 100 x 10,000 ConvNet matrix at 28x28 must not allocate the (100, 10000, 28, 28, 28, 28) covariance."""
    budget = 256 * 2**20
    kernel_fn = make_kernel_fn(architecture="convnet", depth=3, memory_budget_bytes=budget)
    x1 = jax.ShapeDtypeStruct((100, 28, 28, 1), jnp.float32)
    x2 = jax.ShapeDtypeStruct((10_000, 28, 28, 1), jnp.float32)
    compiled = jax.jit(lambda a, b: kernel_fn(a, b, get="ntk")).lower(x1, x2).compile()
    stats = compiled.memory_analysis()
    whole_covariance = 100 * 10_000 * 28**4 * 4
    peak = stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert peak < 2 * budget, f"peak {peak / 2**20:.0f} MiB for a {budget / 2**20:.0f} MiB budget"
    assert peak < whole_covariance / 1000


def test_gradient_memory_is_bounded_too():
    budget = 64 * 2**20
    kernel_fn = make_kernel_fn(architecture="convnet", depth=3, memory_budget_bytes=budget)
    xs = jax.ShapeDtypeStruct((20, 28, 28, 1), jnp.float32)
    xt = jax.ShapeDtypeStruct((200, 28, 28, 1), jnp.float32)
    grad = jax.grad(lambda a, b: jnp.sum(kernel_fn(a, b)) + jnp.sum(kernel_fn(a)))
    stats = jax.jit(grad).lower(xs, xt).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 3 * budget, f"{stats.temp_size_in_bytes / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "spec_kwargs,shape1,shape2,match",
    [
        (dict(architecture="convnet"), (2, 4, 4, 1), (2, 4, 4, 1), "at least 8x8"),
        (dict(architecture="convnet"), (2, 64), (2, 64), "NHWC"),
        (dict(architecture="fc"), (2, 8, 8, 1), (2, 8, 8, 3), "differ in shape"),
        (dict(architecture="fc"), (5,), (5,), "batch axis"),
        (dict(architecture="fc"), (0, 4), (2, 4), "empty"),
    ],
)
def test_bad_inputs_get_clear_errors(spec_kwargs, shape1, shape2, match):
    kernel_fn = make_kernel_fn(**spec_kwargs)
    with pytest.raises(KernelDistillError, match=match):
        kernel_fn(np.zeros(shape1, np.float32), np.zeros(shape2, np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(architecture="resnet"), "unknown kernel architecture"),
        (dict(depth=-1), "non-negative"),
        (dict(architecture="convnet", depth=0), "depth >= 1"),
        (dict(W_std=0.0), "W_std"),
        (dict(b_std=float("nan")), "b_std"),
        (dict(parameterization="standard"), "not implemented"),
    ],
)
def test_bad_specs_are_refused(kwargs, match):
    with pytest.raises(KernelDistillError, match=match):
        KernelSpec(**kwargs)


def test_unknown_get_is_refused():
    with pytest.raises(KernelDistillError, match="get must be"):
        make_kernel_fn()(np.ones((2, 3)), get="both")


def test_default_memory_budget_is_512_mib_on_a_cpu_and_an_eighth_of_an_accelerator():
    from kernel_distill.kernels import default_memory_budget_mb

    class Device:
        def __init__(self, platform, stats):
            self.platform, self.stats = platform, stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    assert default_memory_budget_mb(Device("cpu", {"bytes_limit": 2**40})) == 512.0
    assert default_memory_budget_mb(Device("gpu", {"bytes_limit": 80 * 2**30})) == 80 * 1024 / 8
    assert default_memory_budget_mb(Device("gpu", {"bytes_limit": 2**40})) == 16384.0  # capped
    assert default_memory_budget_mb(Device("gpu", {"bytes_limit": 2 * 2**30})) == 512.0  # floored
    assert default_memory_budget_mb(Device("tpu", None)) == 512.0
    assert default_memory_budget_mb(Device("gpu", RuntimeError("no stats"))) == 512.0


def _expected_budget_mb(device) -> float:
    """The documented rule, written out here without the package's constants: 512 MiB on a CPU; on an
    accelerator an eighth of ``memory_stats()["bytes_limit"]``, at least 512 and at most 16,384 MiB (512
    when the device reports no limit)."""
    if device.platform == "cpu":
        return 512.0
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:
        limit = None
    if not limit:
        return 512.0
    return float(min(16384.0, max(512.0, limit / 8 / 2**20)))


def test_default_memory_budget_follows_the_rule_for_the_device_this_test_runs_on():
    from kernel_distill.kernels import default_memory_budget_mb

    device = jax.devices()[0]
    expected = _expected_budget_mb(device)
    assert default_memory_budget_mb() == expected, (device.platform, expected)
    assert default_memory_budget_mb(device) == expected
