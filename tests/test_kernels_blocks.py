"""The block + VJP API, the banded plan, the architecture registry and spec parsing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill import kernels
from kernel_distill.errors import KernelDistillError
from kernel_distill.finite import LayerNet
from kernel_distill.kernels import KernelSpec, make_kernel_fn
from kernel_distill.kernels.spec import AvgPool, Conv, Dense, Flatten, Relu
from kernel_distill.kip import krr_loss_and_gradients
from kernel_distill.krr import krr_loss, krr_platt_loss

SHAPES = {"fc": (6, 5, 2), "convnet": (8, 8, 2), "convnet3": (9, 7, 1)}


# ConvNet depth 1 (conv, relu, conv, relu, pool, dense) has every layer kind; deeper nets only add
# compilation time (the goldens cover depth).
@pytest.mark.parametrize("architecture,depth,blocks,gets", [
    ("fc", 2, "whole", ("ntk", "nngp")),
    ("fc", 2, "2x3", ("ntk",)),
    ("convnet", 1, "2x3", ("ntk", "nngp")),
    ("convnet3", 2, "2x3", ("ntk",)),
])
def test_block_vjp_kip_gradients_equal_jax_grad(x64, rng, architecture, depth, blocks, gets):
    """7 support and 11 target images in blocks of about 2 x 3 pairs: no block size divides the sizes."""
    shape = SHAPES[architecture]
    x_s, y_s = rng.standard_normal((7, *shape)), rng.standard_normal((7, 3))
    x_t, y_t = rng.standard_normal((11, *shape)), rng.standard_normal((11, 3))
    spec = KernelSpec(architecture, depth)
    budget = 512 * 2**20 if blocks == "whole" else 6 * kernels.bytes_per_pair(spec, shape, 8)
    kernel_fn = make_kernel_fn(spec, memory_budget_bytes=budget, tile_bytes=budget)
    if blocks != "whole":
        assert kernels.api._tile_shape(spec, jnp.zeros((7, *shape)), 11, budget) == (2, 3)

    def whole(a, b, get):
        return krr_loss(kernel_fn(x_t, a, get=get), kernel_fn(a, a, get=get), b, y_t, 1e-3)

    # one program for every get, ours and the reference: one compilation (XLA shares their common parts)
    @jax.jit
    def both(a, b, c, d):
        return {get: (krr_loss_and_gradients(kernel_fn, get, 1e-3, a, b, c, d),
                      jax.value_and_grad(whole, argnums=(0, 1))(a, b, get)) for get in gets}

    for get, ((loss, d_images, d_labels), (ref_loss, (ref_images, ref_labels))) in both(x_s, y_s, x_t, y_t).items():
        assert d_images.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-10)
        for ours, ref in ((d_images, ref_images), (d_labels, ref_labels)):
            scale = float(jnp.abs(ref).max())
            assert float(jnp.abs(ours - ref).max()) <= 1e-10 * scale


def test_block_vjp_platt_gradients_equal_jax_grad(x64, rng):
    """The Platt loss through the block API: images, labels and the log scale as jax.grad of the whole."""
    x_s, y_s = rng.standard_normal((7, 8, 8, 2)), rng.standard_normal((7, 3))
    x_t, y_t = rng.standard_normal((11, 8, 8, 2)), np.eye(3)[np.arange(11) % 3] - 1 / 3
    spec = KernelSpec("convnet", 1)
    budget = 6 * kernels.bytes_per_pair(spec, (8, 8, 2), 8)
    kernel_fn = make_kernel_fn(spec, memory_budget_bytes=budget, tile_bytes=budget)

    def whole(a, b, s):
        return krr_platt_loss(kernel_fn(x_t, a), kernel_fn(a, a), b, y_t, s, 1e-3)

    (loss, d_images, d_labels, d_scale), (ref_loss, refs) = jax.jit(lambda a, b, s: (
        krr_loss_and_gradients(kernel_fn, "ntk", 1e-3, a, b, x_t, y_t, log_scale=s),
        jax.value_and_grad(whole, argnums=(0, 1, 2))(a, b, s)))(x_s, y_s, 0.3)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-10)
    for ours, ref in zip((d_images, d_labels, d_scale), refs):
        assert float(jnp.abs(ours - ref).max()) <= 1e-10 * float(jnp.abs(ref).max())
    assert float(d_scale) != 0


def test_kernel_block_vjp_equals_autodiff_of_the_block(x64, rng):
    spec = KernelSpec("convnet", 1)
    x1, x2 = rng.standard_normal((2, 8, 8, 1)), rng.standard_normal((3, 8, 8, 1))
    ct = rng.standard_normal((2, 3))

    @jax.jit  # one compilation instead of one per primitive (eagerly, most of this test's time)
    def block_vjp(x1, x2, ct):
        s1, s2 = kernels.self_stats(spec, x1), kernels.self_stats(spec, x2)
        dx1, ds1, dx2, ds2 = kernels.kernel_block_vjp(spec, x1, s1, x2, s2, ct)
        only2 = kernels.kernel_block_vjp(spec, x1, s1, x2, s2, ct, wrt=(False, True))
        assert only2[0] is None and only2[1] is None
        return (dx1 + kernels.self_stats_vjp(spec, x1, ds1), dx2 + kernels.self_stats_vjp(spec, x2, ds2), dx2,
                only2[2])

    # ours and autodiff's in one program: one compilation
    (full1, full2, dx2, only2_dx2), (ref1, ref2) = jax.jit(lambda a, b, c: (
        block_vjp(a, b, c), jax.grad(lambda u, v: jnp.sum(c * make_kernel_fn(spec)(u, v)), argnums=(0, 1))(a, b)))(
        x1, x2, ct)
    np.testing.assert_allclose(np.asarray(full1), np.asarray(ref1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(full2), np.asarray(ref2), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(only2_dx2), np.asarray(dx2), rtol=1e-12)


def test_matrix_vjp_of_one_side_equals_that_side_of_both(x64, rng):
    """A VJP for x2 alone runs through the transposed matrix; it must equal the x2 part of the two-sided VJP
    (tiles of 1 x 1 pairs on 2 x 3 images, so both paths run several blocks)."""
    spec = KernelSpec("convnet", 1)
    x1, x2 = rng.standard_normal((2, 8, 8, 1)), rng.standard_normal((3, 8, 8, 1))
    ct = rng.standard_normal((2, 3))
    budget = kernels.bytes_per_pair(spec, (8, 8, 1), 8)

    @jax.jit  # one compilation for the three (eagerly: one per primitive, most of this test's time)
    def three(x1, x2, ct):
        s1, s2 = kernels.self_stats(spec, x1), kernels.self_stats(spec, x2)
        return tuple(kernels.kernel_matrix_vjp(spec, x1, s1, x2, s2, ct, "ntk", budget, wrt)
                     for wrt in ((True, True), (False, True), (True, False)))

    both, only2, only1 = three(x1, x2, ct)
    assert only2[0] is None and only2[1] is None and only1[2] is None and only1[3] is None
    for got, want in [(only2[2], both[2]), (only1[0], both[0])] + list(zip(only2[3], both[3])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-15)
    assert kernels.kernel_matrix_vjp(spec, x1, (), x2, (), ct, "ntk", budget, (False, False)) == (None,) * 4


@pytest.mark.parametrize("size", [(7, 6), (8, 8)])
def test_hand_written_vjps_of_the_band_operators_are_their_adjoints(x64, rng, size):
    """The 3x3 box filter and the 2x2 pool are linear: their VJPs must satisfy <g, A k> = <A^T g, k>
    (odd sizes included, where VALID pooling drops the last row)."""
    from kernel_distill.kernels import exact

    h, w = size
    out_plan = (h // 2, w // 2, 1, 1)
    for name, op, shape in [("box3", exact._box3, (2, 5, 3, h, w)),
                            ("pool", lambda k: exact._pool(k, out_plan), (2, 7, 5, h, w))]:
        k = rng.standard_normal(shape)
        out, vjp = jax.vjp(op, k)
        g = rng.standard_normal(out.shape)
        (adjoint_g,) = vjp(g)
        assert adjoint_g.shape == k.shape, name
        np.testing.assert_allclose(float(jnp.vdot(adjoint_g, k)), float(jnp.vdot(g, out)), rtol=1e-12, err_msg=name)
        # and A^T is the adjoint for every k, not one: check a second direction
        k2 = rng.standard_normal(shape)
        np.testing.assert_allclose(float(jnp.vdot(adjoint_g, k2)), float(jnp.vdot(g, op(k2))), rtol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("implementation", ["_box3_conv", "_box3_slices"])
def test_both_box_filters_equal_a_numpy_3x3_average(x64, rng, implementation):
    """The CPU's convolution and the accelerators' nine slices: each against loops over a zero-padded copy."""
    from kernel_distill.kernels import exact

    k = rng.standard_normal((2, 3, 5, 7, 6))
    padded = np.pad(k, [(0, 0)] * 3 + [(1, 1), (1, 1)])
    want = sum(padded[..., i:i + 7, j:j + 6] for i in range(3) for j in range(3)) / 9.0
    got = jax.jit(getattr(exact, implementation))(jnp.asarray(k))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13, atol=1e-15)


def test_band_radii_follow_the_pools():
    """Offsets |d| <= 7 at full resolution, 3 after the first pool, 1 after the second, 0 at the readout."""
    plan = kernels.layer_plan(KernelSpec("convnet", 3).layers, 32, 32)
    radii = [p[2] for p in plan if p is not None]
    sizes = [p[0] for p in plan if p is not None]
    assert radii == [7] * 5 + [3] * 3 + [1] * 3 + [0]
    assert sizes == [32] * 5 + [16] * 3 + [8] * 3 + [4]
    assert plan[-2:] == (None, None)  # Dense readout and output: flat
    assert kernels.bytes_per_pair(KernelSpec("convnet"), (32, 32, 3), 4) == 12 * 32 * 32 * 15 * 15 * 4
    # 28 -> 14 -> 7 -> 3 (VALID pools drop a row); the smallest accepted image (8x8 for three pools) needs
    # every offset (7 = H - 1), a 16x12 image 7 of 15 and 7 of 11.
    plan28 = kernels.layer_plan(KernelSpec("convnet", 3).layers, 28, 28)
    assert [p[0] for p in plan28 if p is not None][-1] == 3
    assert kernels.layer_plan(KernelSpec("convnet3", 3).layers, 8, 8)[0] == (8, 8, 7, 7)
    assert kernels.layer_plan(KernelSpec("convnet3", 3).layers, 16, 12)[0] == (16, 12, 7, 7)


def test_kernel_of_x_with_itself_computes_self_statistics_once(monkeypatch, rng):
    calls = []
    original = kernels.api.tiled_self_stats
    monkeypatch.setattr(kernels.api, "tiled_self_stats", lambda *a: calls.append(1) or original(*a))
    kernel_fn = make_kernel_fn(architecture="convnet", depth=2)
    x = rng.integers(0, 255, (3, 8, 8, 1)).astype(np.uint8)  # converted to float inside: x2 is x1 still

    def traced_calls(*args):  # statistics are computed while tracing: start from an empty compile cache
        kernels.api._compiled_matrix.cache_clear()
        before = len(calls)
        out = kernel_fn(*args)
        return len(calls) - before, out

    count_default, k_default = traced_calls(x)
    count_same, k_same = traced_calls(x, x)
    count_other, _ = traced_calls(x, x.copy())
    assert (count_default, count_same, count_other) == (1, 1, 2)
    np.testing.assert_array_equal(np.asarray(k_default), np.asarray(k_same))


def test_a_registered_architecture_works_in_the_kernel_and_the_finite_net(rng):
    def pooled_conv(depth):
        return (Conv(), Relu(), AvgPool()) * depth + (Flatten(), Dense(), Relu(), Dense())

    kernels.register_architecture("test-pooled-conv", pooled_conv, default_depth=1, min_depth=1)
    try:
        with pytest.raises(KernelDistillError, match="already registered"):
            kernels.register_architecture("test-pooled-conv", pooled_conv, 1)
        spec = KernelSpec("test-pooled-conv")
        x = rng.standard_normal((3, 6, 6, 2)).astype(np.float32)
        k = np.asarray(make_kernel_fn(spec)(x))
        assert k.shape == (3, 3) and np.all(np.isfinite(k))
        np.testing.assert_allclose(k, k.T, rtol=1e-5)
        net = LayerNet(spec.layers, 5, 16, "ntk")
        assert net.apply(net.init(jax.random.PRNGKey(0), x), x).shape == (3, 5)
    finally:
        kernels.ARCHITECTURE_REGISTRY.pop("test-pooled-conv", None)


@pytest.mark.parametrize("layers,match", [
    ((Flatten(), Dense(), Relu()), "end in a Dense"),
    ((Conv(), Relu(), Dense()), "Dense before Flatten"),
    ((Flatten(), Dense(), Conv(), Dense()), "after Flatten"),
    ((Relu(), Flatten(), Dense()), "affine layer before"),
    ((Conv(size=5), Flatten(), Dense()), "3x3"),
])
def test_unsupported_layer_lists_are_refused(layers, match):
    with pytest.raises(KernelDistillError, match=match):
        kernels.register_architecture("test-bad", lambda depth: layers, default_depth=1)
    assert "test-bad" not in kernels.ARCHITECTURE_REGISTRY


def test_spec_from_dict_refuses_unknown_and_wrongly_typed_fields():
    spec = KernelSpec("convnet", 2, W_std=1.5)
    assert KernelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(KernelDistillError, match="unknown kernel spec field.*dpeth"):
        KernelSpec.from_dict(dict(architecture="fc", dpeth=3))
    with pytest.raises(KernelDistillError, match="JSON object"):
        KernelSpec.from_dict(["fc"])
    with pytest.raises(KernelDistillError, match="depth"):
        KernelSpec.from_dict(dict(architecture="fc", depth="3"))
    with pytest.raises(KernelDistillError, match="W_std must be a number"):
        KernelSpec.from_dict(dict(architecture="fc", W_std="1.4"))


def test_jitted_kernels_are_cached_per_kernel_and_get():
    kernel_fn = make_kernel_fn(architecture="fc")
    assert kernel_fn.jitted("ntk") is make_kernel_fn(architecture="fc").jitted("ntk")
    assert kernel_fn.jitted("ntk") is not kernel_fn.jitted("nngp")
