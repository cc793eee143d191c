"""The random-feature (RFAD) approximation of the NNGP: checked against the exact kernel, in KIP and in files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_distill import krr
from kernel_distill.cli import main
from kernel_distill.data import prepare_dataset
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import load_distilled
from kernel_distill.kernels import KernelSpec, RandomFeatureKernelFn, RandomFeatures, make_kernel_fn
from kernel_distill.kernels import random_features as rf
from kernel_distill.kip import KipConfig, run_kip
from kernel_distill.objective import random_feature_loss_and_gradients


def _images(n=6, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)


def _relative_error(approx, exact):
    return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))


@pytest.mark.parametrize("architecture, depth, image_shape", [
    ("convnet", 2, (8, 8, 3)), ("convnet3", 2, (8, 8, 3)), ("fc", 1, (4, 4, 2))])
def test_error_falls_like_one_over_sqrt_of_models_times_width(architecture, depth, image_shape):
    """Relative Frobenius error against the exact NNGP, mean over 3 seeds of the networks.

    Measured error * sqrt(M * W): 1.3-2.1 for convnet depth 2 on 8x8x3 (the readout averages over positions),
    1.7-2.7 for fc depth 1 and 2.8-3.8 for fc depth 2, from M * W = 32 to 32,768. The stated tolerance is
    5 / sqrt(M * W), and 16x more models must cut the error at least 2.5x (4x for pure 1/sqrt(M W))."""
    x = _images(6, image_shape[0], image_shape[2]).reshape(6, *image_shape)
    exact = make_kernel_fn(KernelSpec(architecture, depth=depth))(x, get="nngp")
    errors = {}
    for models, width in [(1, 32), (16, 32)]:
        errors[models] = np.mean([
            _relative_error(make_kernel_fn(KernelSpec(architecture, depth=depth,
                                                      random_features=RandomFeatures(models, width, seed)))(x), exact)
            for seed in range(3)])
        assert errors[models] < 5 / np.sqrt(models * width), (models, width, errors[models])
    assert errors[16] < errors[1] / 2.5, errors


def test_features_scaled_to_the_readout_covariance():
    """K = Phi Phi^T, with Phi the scaled readout inputs of the M networks and the bias feature b_std."""
    spec = KernelSpec("convnet3", depth=1, random_features=RandomFeatures(3, 5, seed=7))
    x = jnp.asarray(_images(4, 4, 2))
    params = rf.fixed_network_params(spec, x.shape[1:])
    phi = rf.features(spec, params, x)
    assert phi.shape == (4, rf.feature_dimension(spec, x.shape[1:])) == (4, 3 * 2 * 2 * 5 + 1)
    np.testing.assert_allclose(phi[:, -1], spec.b_std)
    raw = jax.lax.map(lambda p: rf._feature_net(spec).apply(p, x).reshape(4, -1), params)  # (M, n, fan_in)
    by_hand = spec.W_std**2 / (3 * raw.shape[-1]) * jnp.einsum("mif,mjf->ij", raw, raw) + spec.b_std**2
    np.testing.assert_allclose(RandomFeatureKernelFn(spec)(x), by_hand, rtol=1e-5)


def _numpy_instance_norm_features(spec, params, x):
    """Phi(x) of ``convnet3`` depth 1 with instance norm, in float64 numpy from the networks' parameters:
    3x3 SAME conv (zero padding) + bias, per-image, per-channel normalisation, ReLU, 2x2 average pool."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    blocks = []
    for m in range(spec.random_features.models):
        layer = jax.tree_util.tree_map(lambda a, m=m: np.asarray(a[m], np.float64), params)["params"]["_Conv_0"]
        z = sum(padded[:, i:i + h, j:j + w, :] @ layer["kernel"][i, j] for i in range(3) for j in range(3))
        z = spec.W_std / np.sqrt(9 * c) * z + spec.b_std * layer["bias"]
        z = (z - z.mean(axis=(1, 2), keepdims=True)) / np.sqrt(z.var(axis=(1, 2), keepdims=True) + 1e-5)
        z = np.maximum(z, 0)
        z = z.reshape(n, h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4)).reshape(n, -1)
        blocks.append(spec.W_std / np.sqrt(spec.random_features.models * z.shape[1]) * z)
    return np.concatenate(blocks + [np.full((n, 1), spec.b_std)], axis=1)


def test_instance_norm_features_equal_a_numpy_forward_pass():
    spec = KernelSpec("convnet3", depth=1, random_features=RandomFeatures(2, 5, seed=4, norm="instance"))
    x = jnp.asarray(_images(3, 6, 2))
    params = rf.fixed_network_params(spec, x.shape[1:])
    np.testing.assert_allclose(rf.features(spec, params, x), _numpy_instance_norm_features(spec, params, x),
                               rtol=2e-5, atol=1e-6)


def test_instance_norm_makes_the_kernel_blind_to_image_contrast():
    """Without biases a conv is linear, so the normalised network cannot see an image's scale: K(3x, y) = K(x, y).
    The plain network is positively homogeneous instead: K(3x, y) = 3 K(x, y)."""
    x, y = _images(3, 8, 3), _images(4, 8, 3, seed=1)
    for norm, factor in (("instance", 1.0), ("none", 3.0)):
        kernel_fn = make_kernel_fn(KernelSpec("convnet3", depth=2, b_std=0.0,
                                              random_features=RandomFeatures(2, 8, norm=norm)))
        np.testing.assert_allclose(kernel_fn(3 * x, y), factor * kernel_fn(x, y), rtol=1e-4)


def test_kernel_function_interface_and_errors():
    spec = KernelSpec("convnet", depth=1, random_features=RandomFeatures(2, 8))
    kernel_fn = make_kernel_fn(spec)
    assert isinstance(kernel_fn, RandomFeatureKernelFn)
    x1, x2 = _images(3, 4, 1), _images(5, 4, 1, seed=1)
    k = kernel_fn(x1, x2)
    assert k.shape == (3, 5)
    np.testing.assert_allclose(kernel_fn.jitted("nngp")(x1, x2), k, rtol=1e-6)
    np.testing.assert_allclose(kernel_fn(x1)[:, :3], kernel_fn(x1, x1), rtol=1e-6)
    np.testing.assert_allclose(kernel_fn(x1.astype(np.float64)), kernel_fn(x1), rtol=1e-5)  # same networks
    with pytest.raises(KernelDistillError, match="NNGP only"):
        kernel_fn(x1, get="ntk")
    with pytest.raises(KernelDistillError, match="positive integer"):
        RandomFeatures(0, 8)
    with pytest.raises(KernelDistillError, match="unknown random_features"):
        KernelSpec.from_dict(dict(spec.to_dict(), random_features=dict(models=2, widht=8)))
    assert KernelSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "random_features"}  # a file written before RF kernels
    assert KernelSpec.from_dict(old).random_features is None
    assert spec.name == "convnet-rf" and KernelSpec("convnet").name == "convnet"


def test_gradient_through_the_features_equals_autodiff_of_the_kernel_matrix(x64):
    spec = KernelSpec("convnet", depth=1, random_features=RandomFeatures(2, 6))
    kernel_fn = make_kernel_fn(spec)
    rng = np.random.default_rng(3)
    x_s, x_t = jnp.asarray(rng.normal(size=(4, 4, 4, 1))), jnp.asarray(rng.normal(size=(7, 4, 4, 1)))
    y_s, y_t = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(7, 3)))

    def whole_loss(xs, ys):
        return krr.krr_loss(kernel_fn(x_t, xs), kernel_fn(xs), ys, y_t, 1e-3)

    def platt_loss(xs, ys, t):
        return krr.krr_platt_loss(kernel_fn(x_t, xs), kernel_fn(xs), ys, y_t, t, 1e-3)

    # Every quantity in one program: one compilation, sharing the feature networks' forward passes (five
    # separate ones were most of this test's time).
    @jax.jit
    def everything(xs, ys, t, key):
        return dict(
            ours=random_feature_loss_and_gradients(spec, None, 1e-3, xs, ys, x_t, y_t, 2**20),
            expected=jax.value_and_grad(whole_loss, argnums=(0, 1))(xs, ys),
            platt=random_feature_loss_and_gradients(spec, None, 1e-3, xs, ys, x_t, y_t, 2**20, log_scale=t),
            platt_expected=jax.value_and_grad(platt_loss, argnums=(0, 1, 2))(xs, ys, t),
            fresh=random_feature_loss_and_gradients(spec, key, 1e-3, xs, ys, x_t, y_t, 2**20)[0])

    out = everything(x_s, y_s, -0.4, jax.random.PRNGKey(1))
    loss, dx, dy = out["ours"]
    expected_loss, (expected_dx, expected_dy) = out["expected"]
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(dy, expected_dy, rtol=1e-8, atol=1e-14)
    assert np.all(np.isfinite(dx))
    # The Platt loss: its three gradients, the scale's included, as autodiff of the whole loss.
    platt, expected = out["platt"], out["platt_expected"]
    np.testing.assert_allclose(platt[0], expected[0], rtol=1e-10)
    for ours, ref in zip(platt[1:], expected[1]):
        np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-14)
    # Fresh networks (a key) give another loss; the same key the same one.
    again = everything(x_s, y_s, -0.4, jax.random.PRNGKey(1))["fresh"]
    other = everything(x_s, y_s, -0.4, jax.random.PRNGKey(2))["fresh"]
    assert out["fresh"] != loss and out["fresh"] == again and other != out["fresh"]


def test_krr_in_feature_space_equals_krr_with_the_kernel():
    """More support points than features: the (D, D) solve gives the (n, n) solve's predictions."""
    spec = KernelSpec("fc", depth=1, random_features=RandomFeatures(2, 4))
    kernel_fn = make_kernel_fn(spec)
    rng = np.random.default_rng(0)
    x_s, x_t = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=(30, 5)).astype(np.float32)
    y_s = np.eye(3)[rng.integers(0, 3, 40)] - 1 / 3
    assert krr.uses_feature_space(kernel_fn, 40, (5,)) and not krr.uses_feature_space(kernel_fn, 9, (5,))
    reg = 1e-2
    weights = krr.feature_weights(krr.feature_blocks(kernel_fn, x_s, 16), y_s, reg)
    in_features = krr.feature_blocks(kernel_fn, x_t, 16) @ weights
    k = lambda a, b: np.asarray(kernel_fn(a.astype(np.float64), b.astype(np.float64)), np.float64)  # noqa: E731
    with jax.enable_x64(True):
        with_kernel = k(x_t, x_s) @ krr.solve_support(k(x_s, x_s), y_s, reg)
    np.testing.assert_allclose(in_features, with_kernel, rtol=1e-3, atol=1e-4)
    labels = rng.integers(0, 3, 30)
    result = krr.evaluate(kernel_fn, x_s, y_s, x_t, labels, reg=reg, get="nngp", progress=False, block_size=16)
    assert result.accuracy == np.mean(with_kernel.argmax(1) == labels)


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset("digits", progress=False, val_size=200)


@pytest.mark.parametrize("loss", ["mse", "platt"])
def test_kip_with_the_random_feature_kernel_lowers_the_loss(tmp_path, digits, loss):
    """Real data (digits 8x8), 1 image per class, fresh networks each step; either objective."""
    spec = KernelSpec("convnet3", depth=2, random_features=RandomFeatures(2, 16))
    config = KipConfig(dataset="digits", per_class=1, kernel=spec, get="nngp", learn_labels=True,
                       target_batch_size=300, steps=60, eval_every=60, log_every=5, learning_rate=0.02, loss=loss)
    summary = run_kip(config, digits, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    accuracies = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert accuracies[-1] > accuracies[0], accuracies
    assert summary["step"] == 60
    with pytest.raises(KernelDistillError, match="NNGP only"):
        KipConfig(kernel=spec, get="ntk")
    with pytest.raises(KernelDistillError, match="loss must be one of mse, platt"):
        KipConfig(loss="ce")
    with pytest.raises(KernelDistillError, match="needs a random-feature kernel"):
        KipConfig(rf_fixed_networks=True)
    with pytest.raises(KernelDistillError, match="the fc architecture has none"):
        KernelSpec("fc", random_features=RandomFeatures(norm="instance"))
    with pytest.raises(KernelDistillError, match="norm must be one of none, instance"):
        RandomFeatures(norm="batch")
    from kernel_distill.cli import RF_NORM_CHOICES
    from kernel_distill.kernels.spec import RF_NORMS
    assert RF_NORM_CHOICES == RF_NORMS


@pytest.mark.parametrize("norm", ["none", "instance"])
def test_a_file_made_with_the_kernel_evaluates_with_it(tmp_path, capsys, norm):
    out = tmp_path / "run"
    argv = ["kip", "--dataset", "digits", "--per-class", "1", "--kernel", "convnet-rf", "--depth", "2",
            "--rf-models", "2", "--rf-width", "8", "--rf-seed", "3", "--steps", "4", "--eval-every", "4",
            "--target-batch", "100", "--out", str(out), "--no-progress"]
    assert main(argv + ([] if norm == "none" else ["--rf-norm", norm])) == 0
    capsys.readouterr()
    distilled = load_distilled(out / "distilled.npz")
    assert distilled.metadata["kernel"]["random_features"] == dict(models=2, width=8, seed=3, norm=norm)
    assert distilled.metadata["get"] == "nngp"
    recorded = json.loads((out / "results.json").read_text())["metrics"]["test_accuracy_final"]
    assert main(["evaluate", str(out / "distilled.npz"), "--dataset", "digits", "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out
    assert ("convnet-rf NNGP" if norm == "none" else "convnet-rf (instance norm) NNGP") in printed
    record = json.loads(printed.strip().splitlines()[-1])
    assert record["config"]["kernel"]["random_features"] == dict(models=2, width=8, seed=3, norm=norm)
    assert record["metrics"]["test_accuracy"] == pytest.approx(recorded, abs=1e-12)
    if norm != "none":  # a resume that would change the kernel is refused with one line
        assert main(["kip", "--resume", str(out), "--steps", "6", "--rf-norm", "none", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--rf-norm would change" in err and err.count("\n") == 1, err
    # The exact kernel of the same architecture, asked for explicitly.
    assert main(["evaluate", str(out / "distilled.npz"), "--dataset", "digits", "--kernel", "convnet",
                 "--get", "nngp", "--no-progress"]) == 0
    assert "convnet NNGP" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["kip", "--dataset", "digits", "--kernel", "convnet-rf", "--get", "ntk"], "NNGP only"),
    (["kip", "--dataset", "digits", "--kernel", "convnet", "--rf-models", "4"], "need a random-feature kernel"),
    (["kip", "--dataset", "digits", "--kernel", "convnet-rf", "--rf-width", "0"], "width must be a positive"),
    (["kip", "--dataset", "digits", "--kernel", "convnet-rf", "--backend", "ray"], "local backend only"),
    (["kip", "--dataset", "digits", "--rf-fixed-networks"], "needs a random-feature kernel"),
    (["kip", "--dataset", "digits", "--kernel", "convnet", "--rf-norm", "instance"], "need a random-feature kernel"),
    (["baseline", "--dataset", "digits", "--kernel", "convnet-rf", "--get", "ntk"], "NNGP only"),
])
def test_cli_errors(tmp_path, capsys, argv, match):
    extra = ["--out", str(tmp_path / "x")] if argv[0] == "kip" else []
    assert main(argv + ["--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_label_solve_and_baseline_accept_the_kernel(tmp_path, capsys):
    assert main(["baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1", "--kernel", "convnet-rf", "--depth", "2",
                 "--rf-models", "2", "--rf-width", "8", "--no-progress"]) == 0
    assert "convnet-rf NNGP" in capsys.readouterr().out
    out = tmp_path / "ls"
    assert main(["label-solve", "--dataset", "digits", "--support-size", "20", "--kernel", "convnet3-rf", "--depth", "2",
                 "--rf-models", "2", "--rf-width", "8", "--out", str(out), "--no-progress"]) == 0
    assert load_distilled(out / "distilled.npz").metadata["kernel"]["random_features"]["width"] == 8
