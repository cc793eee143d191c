"""Layers that carry their rules: a layer defined here, outside the package, works in the exact kernel, the
finite network and the random-feature networks; the instance norm is a layer on the random-feature path."""

from __future__ import annotations

import ast
import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill import kernels
from kernel_distill.errors import KernelDistillError
from kernel_distill.finite import LayerNet
from kernel_distill.kernels import KernelSpec, RandomFeatures, make_kernel_fn
from kernel_distill.kernels import random_features as rf
from kernel_distill.kernels.layers import Layer, map_ntk, min_spatial_size, output_shape, serial
from kernel_distill.kernels.spec import AvgPool, Conv, Dense, Flatten, InstanceNorm, Relu

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "src" / "kernel_distill" / "kernels"


@dataclasses.dataclass(frozen=True)
class Scale(Layer):
    """``x -> c x``, no parameters. Every covariance of its outputs is ``c^2`` times that of its inputs, and
    so is the NTK (the Jacobian of everything before it is scaled by ``c``)."""

    c: float = 2.0

    def kernel(self, nngp, ntk, step):
        return self.c ** 2 * nngp, map_ntk(lambda k: self.c ** 2 * k, ntk)

    def apply(self, params, x, settings):
        return self.c * x


C = 3.0
# Each scaled architecture and the built-in one it equals without the Scale layer.
SCALED = {
    "test-scaled-fc": ((Flatten(), Dense(), Scale(C), Relu(), Dense()), ("fc", 1), (5, 4, 2)),
    "test-scaled-conv": ((Conv(), Scale(C), Relu(), AvgPool(), Flatten(), Dense()), ("convnet3", 1), (6, 6, 2)),
}


@pytest.fixture(scope="module", autouse=True)
def scaled_architectures():
    for name, (layers, _, _) in SCALED.items():
        kernels.register_architecture(name, lambda depth, layers=layers: serial(*layers), default_depth=1)
    yield
    for name in SCALED:
        kernels.ARCHITECTURE_REGISTRY.pop(name, None)


def _closed_form(plain_nngp, plain_ntk, b_std):
    """Scale(c) right before the ReLU: the ReLU is positively homogeneous, so the readout sees ``c^2`` times
    the unscaled covariance plus the same bias variance: ``nngp = c^2 (nngp_0 - b^2) + b^2``, and the NTK's
    part from the layers below, ``ntk - nngp``, is ``c^2`` times theirs."""
    nngp = C ** 2 * (plain_nngp - b_std ** 2) + b_std ** 2
    return nngp, nngp + C ** 2 * (plain_ntk - plain_nngp)


@pytest.mark.parametrize("name", sorted(SCALED))
def test_a_layer_defined_outside_the_package_gets_its_exact_kernel(x64, rng, name):
    _, (architecture, depth), shape = SCALED[name]
    x1, x2 = rng.standard_normal((3, *shape)), rng.standard_normal((4, *shape))
    scaled, plain = make_kernel_fn(KernelSpec(name)), make_kernel_fn(KernelSpec(architecture, depth))
    b_std = KernelSpec(name).b_std

    def closed_ntk_sum(a):
        return _closed_form(plain(a, x2, "nngp"), plain(a, x2, "ntk"), b_std)[1].sum()

    # everything in one compiled program (separately: eight compilations, most of this test's time)
    @jax.jit
    def everything(a):
        return dict(closed=_closed_form(plain(a, x2, "nngp"), plain(a, x2, "ntk"), b_std),
                    scaled=(scaled(a, x2, "nngp"), scaled(a, x2, "ntk")),
                    grad=jax.grad(lambda z: scaled(z, x2, "ntk").sum())(a), grad_closed=jax.grad(closed_ntk_sum)(a))

    out = everything(x1)
    (nngp, ntk), (scaled_nngp, scaled_ntk) = out["closed"], out["scaled"]
    np.testing.assert_allclose(scaled_nngp, nngp, rtol=1e-12)
    np.testing.assert_allclose(scaled_ntk, ntk, rtol=1e-12)
    # and through the gradient: the self statistics (the ReLU's variances) saw the Scale layer too
    np.testing.assert_allclose(out["grad"], out["grad_closed"], rtol=1e-10, atol=1e-14)


def test_the_finite_network_of_the_new_layer_converges_to_its_exact_nngp():
    """Monte Carlo, as tests/test_kernels_montecarlo.py: 24 networks of width 512 with 128 readout outputs;
    ``|mean - k| <= 4 standard errors + 3% of the diagonal scale``, and a 10% wrong ``c`` is rejected."""
    spec = KernelSpec("test-scaled-fc")
    x = np.random.default_rng(1).standard_normal((4, 5, 4, 2)).astype(np.float32)
    net = LayerNet(spec.layers, 128, 512, "ntk", spec.W_std, spec.b_std)

    @jax.jit
    def empirical(key):
        f = net.apply(net.init(key, x), x)
        return f @ f.T / f.shape[1]

    samples = np.stack([np.asarray(empirical(jax.random.PRNGKey(seed)), np.float64) for seed in range(24)])
    exact = np.asarray(make_kernel_fn(spec)(x, get="nngp"), np.float64)
    mean, standard_error = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(len(samples))
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.all(np.abs(mean - exact) <= 4 * standard_error + 0.03 * scale)
    wrong = (exact - spec.b_std ** 2) * 1.1 ** 2 + spec.b_std ** 2  # the kernel of Scale(1.1 c)
    assert not np.all(np.abs(mean - wrong) <= 4 * standard_error + 0.03 * scale)


def test_the_finite_network_applies_the_new_layer_between_the_others(rng):
    """Same parameters with and without the Scale layer (it has none): hidden features scale by exactly c."""
    x = rng.standard_normal((3, 6, 6, 2)).astype(np.float32)
    layers, (architecture, depth), _ = SCALED["test-scaled-conv"]
    scaled_net = LayerNet(layers[:-1], 0, 8, "ntk")
    plain_net = LayerNet(KernelSpec(architecture, depth).layers[:-1], 0, 8, "ntk")
    params = plain_net.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(scaled_net.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(scaled_net.apply(params, x), C * plain_net.apply(params, x), rtol=1e-6)
    assert output_shape(layers, x.shape[1:], 8) == (8,) and output_shape(layers[:-1], x.shape[1:], 8) == (72,)


@pytest.mark.parametrize("name", sorted(SCALED))
def test_the_random_feature_networks_of_the_new_layer(rng, name):
    """The same seed draws the same networks with and without the layer, so the random-feature kernel obeys
    the closed form exactly (up to float32 rounding); and it approximates the new layer's exact NNGP."""
    _, (architecture, depth), shape = SCALED[name]
    features = RandomFeatures(8, 64, seed=2)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    scaled = make_kernel_fn(KernelSpec(name, random_features=features))(x)
    plain = make_kernel_fn(KernelSpec(architecture, depth, random_features=features))(x)
    b2 = KernelSpec(name).b_std ** 2
    np.testing.assert_allclose(scaled, C ** 2 * (plain - b2) + b2, rtol=1e-5)
    exact = make_kernel_fn(KernelSpec(name))(x, get="nngp")
    assert float(jnp.linalg.norm(scaled - exact) / jnp.linalg.norm(exact)) < 5 / math.sqrt(8 * 64)


@dataclasses.dataclass(frozen=True)
class ImageScale(Scale):
    """A Scale that declares it needs images (the placement rule then refuses it after Flatten)."""

    takes = "image"


def test_the_new_layer_obeys_the_placement_rules():
    with pytest.raises(KernelDistillError, match="ImageScale after Flatten"):
        kernels.register_architecture("test-bad-scale", lambda d: (Flatten(), Dense(), ImageScale(), Dense()), 1)
    with pytest.raises(KernelDistillError, match="end in a Dense"):
        serial(Flatten(), Dense(), Scale())
    assert "test-bad-scale" not in kernels.ARCHITECTURE_REGISTRY
    assert min_spatial_size((Conv(), Scale(), AvgPool(), AvgPool(), Flatten(), Dense())) == 4


# ----------------------------------------------------------------------------------------------------
# The instance norm: a layer that the random-feature networks insert after each conv.


def test_instance_norm_is_a_layer_after_each_conv_of_the_random_networks():
    spec = KernelSpec("convnet", depth=2, random_features=RandomFeatures(2, 8, norm="instance"))
    assert rf.feature_layers(spec) == (Conv(), InstanceNorm(), Relu(), Conv(), InstanceNorm(), Relu(), AvgPool(),
                                       Conv(), InstanceNorm(), Relu(), AvgPool(), Flatten())
    plain = dataclasses.replace(spec, random_features=RandomFeatures(2, 8))
    assert rf.feature_layers(plain) == spec.layers[:-1]
    assert rf.readout_fan_in(spec, (8, 8, 3)) == rf.readout_fan_in(plain, (8, 8, 3)) == 2 * 2 * 8


# The random-feature kernel with instance norm as computed before the norm became a layer (a flag of the
# finite network then): the networks, their parameters and the arithmetic must not change, or the zoo's
# convnet3rf-in sets would evaluate differently. Inputs: sin(0.7 i), float32.
BEFORE_THE_LAYER = {
    ("convnet3", 2): [[0.4628278911113739, 0.42105036973953247, 0.41117745637893677],
                      [0.42105036973953247, 0.45316702127456665, 0.41014009714126587],
                      [0.41117745637893677, 0.41014009714126587, 0.44307756423950195]],
    ("convnet", 1): [[0.527497410774231, 0.4115276336669922, 0.29258084297180176],
                     [0.4115276336669922, 0.5621362924575806, 0.3668283224105835],
                     [0.29258084297180176, 0.3668283224105835, 0.5248066782951355]],
}


@pytest.mark.parametrize("architecture, depth", sorted(BEFORE_THE_LAYER))
def test_instance_norm_random_features_equal_those_from_before_the_layer(architecture, depth):
    x = np.sin(np.arange(3 * 8 * 8 * 2) * 0.7).reshape(3, 8, 8, 2).astype(np.float32)
    spec = KernelSpec(architecture, depth=depth, random_features=RandomFeatures(2, 8, seed=3, norm="instance"))
    np.testing.assert_allclose(make_kernel_fn(spec)(x), BEFORE_THE_LAYER[architecture, depth], rtol=1e-6)


def test_instance_norm_in_a_finite_network_and_not_in_the_exact_kernel(rng):
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    net = LayerNet((Conv(), InstanceNorm()), 0, 4, "ntk")
    z = net.apply(net.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.var(axis=(1, 2)), 1, rtol=1e-3)  # (var / (var + 1e-5))
    kernels.register_architecture("test-instance-norm", lambda d: (Conv(), InstanceNorm(), Relu(), Flatten(), Dense()),
                                  default_depth=1)
    try:
        with pytest.raises(KernelDistillError, match="InstanceNorm has no closed-form kernel"):
            make_kernel_fn(KernelSpec("test-instance-norm"))(x)
        features = make_kernel_fn(KernelSpec("test-instance-norm", random_features=RandomFeatures(2, 4)))(x)
        assert features.shape == (2, 2) and np.all(np.isfinite(features))
    finally:
        kernels.ARCHITECTURE_REGISTRY.pop("test-instance-norm", None)


# ----------------------------------------------------------------------------------------------------
# The design: the kernel engine reads no layer types and imports nothing from the finite nets.


def _modules(path: pathlib.Path) -> list[str]:
    return [node.module for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module] + \
        [a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import) for a in node.names]


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_the_kernels_package_imports_nothing_from_the_finite_networks(path):
    assert "kernel_distill.finite" not in _modules(path)


@pytest.mark.parametrize("module", ["kernels/exact.py", "kernels/api.py", "kernels/random_features.py",
                                    "finite.py"])
def test_no_walk_asks_a_layer_for_its_type(module):
    names = {"Dense", "Conv", "Relu", "AvgPool", "Flatten", "InstanceNorm"}
    tree = ast.parse((KERNELS.parent / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            mentioned = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            assert not mentioned & names, ast.unparse(node)
