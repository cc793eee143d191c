"""Finite networks: parameter counts as documented, training beats chance on held-out digits, CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kernel_distill.cli import main
from kernel_distill.results import read_results
from kernel_distill.finite import TrainConfig, build_model, count_parameters, train
from kernel_distill.data import prepare_dataset
from kernel_distill.preprocess import centered_one_hot


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset("digits", progress=False)


@pytest.mark.parametrize("name,width,depth,shape,expected", [
    # (9 C + 1) w + depth (9 w + 1) w + (w H' W' + 1) classes, H' = 16 // 2**2 = 4
    ("convnet", 8, 2, (16, 16, 3), (9 * 3 + 1) * 8 + 2 * (9 * 8 + 1) * 8 + (8 * 4 * 4 + 1) * 10),
    ("convnet3", 8, 2, (16, 16, 3), (9 * 3 + 1) * 8 + (9 * 8 + 1) * 8 + (8 * 4 * 4 + 1) * 10),
    # (d + 1) w + (depth - 1)(w + 1) w + (w + 1) classes
    ("fc", 32, 3, (8, 8, 1), (64 + 1) * 32 + 2 * (32 + 1) * 32 + (32 + 1) * 10),
    # per block (9 c_in + 1) w + 2 w, then (w H' W' + 1) classes, H' = 32 // 8
    ("evalnet", 16, 3, (32, 32, 3), (28 * 16 + 32) + 2 * ((9 * 16 + 1) * 16 + 32) + (16 * 16 + 1) * 10),
])
def test_parameter_counts_match_the_docstrings(name, width, depth, shape, expected):
    model = build_model(name, 10, width, depth)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, *shape), np.float32))
    assert count_parameters(params) == expected
    assert model.apply(params, np.zeros((2, *shape), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["fc", "convnet"])
def test_ntk_parameterization_has_order_one_outputs(name, rng):
    model = build_model(name, 10, 256, 1 if name == "fc" else 2, parameterization="ntk")
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    out = np.asarray(model.apply(model.init(jax.random.PRNGKey(0), x), x))
    assert 0.05 < out.std() < 5


@pytest.mark.parametrize("name", ["fc", "evalnet"])
def test_training_on_ten_images_per_class_beats_chance_on_held_out_digits(digits, name):
    """Real data: 100 digits training images; the 359 test images are held out. Measured: fc 67.7%, evalnet 73.5%."""
    idx = np.concatenate([np.flatnonzero(digits.y_train == c)[:10] for c in range(10)])
    model = build_model(name, 10, 64)
    result = train(model, digits.x_train[idx], centered_one_hot(digits.y_train[idx], 10), digits.x_test,
                   digits.y_test, TrainConfig(steps=200, eval_every=100), jax.random.PRNGKey(0), progress=False)
    assert result["test_accuracy"] > 0.5  # chance is 0.1
    assert [step for step, _ in result["curve"]] == [100, 200]
    assert 0 < result["eval_seconds"] < result["seconds"]


def test_cli_transfer(tmp_path, capsys):
    out = tmp_path / "t"
    code = main(["transfer", "--natural-per-class", "5", "--dataset", "digits", "--model", "fc", "--width", "64",
                 "--steps", "50", "--seeds", "2", "--eval-every", "25", "--out", str(out), "--no-progress"])
    assert code == 0
    record = read_results(out)
    metrics = record["metrics"]
    assert len(metrics["test_accuracies"]) == 2 and 0.2 < metrics["test_accuracy"] <= 1.0
    assert 0 < metrics["eval_seconds"] and 0 < metrics["train_seconds"]
    assert [c[-1][0] for c in record["curves"].values()] == [50, 50]  # one test curve per seed
    assert (out / "transfer_curve.png").is_file()
    capsys.readouterr()
    assert main(["transfer", "--model", "fc"]) == 2
    assert "FILE or --natural-per-class" in capsys.readouterr().err
    for flag, message in [("--width", "--width must be a positive integer"), ("--steps", "steps must be positive")]:
        assert main(["transfer", "--natural-per-class", "1", "--dataset", "digits", flag, "0"]) == 2
        assert message in capsys.readouterr().err
    assert main(["transfer", str(tmp_path / "missing.npz")]) == 2
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 28, 28, 1), np.float32), labels=np.zeros((3, 10), np.float32))
    capsys.readouterr()
    assert main(["transfer", str(wrong), "--dataset", "digits"]) == 2
    assert "images of shape" in capsys.readouterr().err
    for ignored in ("--float64", "--memory-budget-mb"):  # finite nets train in float32 without kernel tiles
        with pytest.raises(SystemExit):
            main(["transfer", "--natural-per-class", "1", "--dataset", "digits", ignored])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_cli_transfer_learning_rate_defaults_per_model(tmp_path, capsys):
    """The un-normalised KIP ConvNet gets a lower default lr than fc / evalnet; an explicit --lr wins."""
    learning_rates = {}
    for model, extra in [("convnet", []), ("fc", []), ("convnet", ["--lr", "0.02"])]:
        out = tmp_path / f"{model}{len(extra)}"
        assert main(["transfer", "--natural-per-class", "2", "--dataset", "digits", "--model", model, "--width", "8",
                     "--steps", "2", "--seeds", "1", "--eval-every", "2", "--test-limit", "20", "--out", str(out),
                     "--no-progress", *extra]) == 0
        learning_rates[(model, bool(extra))] = read_results(out)["config"]["train"]["learning_rate"]
    capsys.readouterr()
    assert learning_rates == {("convnet", False): 0.01, ("fc", False): 0.05, ("convnet", True): 0.02}
