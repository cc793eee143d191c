"""Label Solve: against an independent dense numpy least-squares solve, blocking, optimality, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernel_distill.cli import main
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import load_distilled
from kernel_distill.kernels import make_kernel_fn
from kernel_distill.results import read_results
from kernel_distill.label_solve import solve_labels, training_objective
from kernel_distill.data import prepare_dataset
from kernel_distill.preprocess import centered_one_hot


@pytest.fixture
def problem(rng):
    x_support = rng.normal(size=(6, 4, 4, 1))
    x_train = rng.normal(size=(41, 4, 4, 1))
    y_train = centered_one_hot(rng.integers(0, 3, 41), 3).astype(np.float64)
    return x_support, x_train, y_train


def test_matches_a_dense_numpy_least_squares_solve(x64, problem):
    x_support, x_train, y_train = problem
    kernel_fn = make_kernel_fn(architecture="fc", depth=2)
    reg, ls_reg = 1e-3, 1e-4
    result = solve_labels(kernel_fn, x_support, x_train, y_train, reg=reg, ls_reg=ls_reg, block_size=10,
                          progress=False)
    # Independent: ridge least squares min ||K_ts z - y_t||^2 + eps ||z||^2 as one stacked lstsq problem.
    k_ts = np.asarray(kernel_fn(x_train, x_support))
    k_ss = np.asarray(kernel_fn(x_support))
    n = len(k_ss)
    eps = ls_reg * np.trace(k_ts.T @ k_ts) / n
    stacked = np.vstack([k_ts, np.sqrt(eps) * np.eye(n)])
    z = np.linalg.lstsq(stacked, np.vstack([y_train, np.zeros((n, 3))]), rcond=None)[0]
    expected = (k_ss + reg * np.trace(k_ss) / n * np.eye(n)) @ z
    np.testing.assert_allclose(result.labels, expected, rtol=1e-4, atol=1e-5)
    assert result.num_train == 41


def test_blocked_accumulation_equals_unblocked(x64, problem):
    x_support, x_train, y_train = problem
    kernel_fn = make_kernel_fn(architecture="convnet3", depth=1)
    one = solve_labels(kernel_fn, x_support, x_train, y_train, block_size=len(x_train), progress=False)
    many = solve_labels(kernel_fn, x_support, x_train, y_train, block_size=4, progress=False)
    np.testing.assert_allclose(many.gram, one.gram, rtol=1e-12)
    np.testing.assert_allclose(many.projected_targets, one.projected_targets, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(many.labels, one.labels, rtol=1e-5)


def test_solved_labels_never_do_worse_on_the_training_objective():
    """Real data (digits): the solved labels minimise the training MSE that one-hot labels only sample."""
    data = prepare_dataset("digits", progress=False)
    kernel_fn = make_kernel_fn(architecture="fc")
    y_train = centered_one_hot(data.y_train, 10)
    for seed in range(3):
        idx = np.random.default_rng(seed).choice(len(data.x_train), 30, replace=False)
        xs, one_hot = data.x_train[idx], y_train[idx]
        solved = solve_labels(kernel_fn, xs, data.x_train, y_train, progress=False).labels
        before = training_objective(kernel_fn, xs, one_hot, data.x_train, y_train)
        after = training_objective(kernel_fn, xs, solved, data.x_train, y_train)
        assert after < before


def test_cli_outputs_and_accuracy_gain(tmp_path, capsys):
    out = tmp_path / "ls"
    code = main(["label-solve", "--dataset", "digits", "--support-size", "20", "--out", str(out), "--no-progress"])
    assert code == 0
    record = read_results(out)
    metrics = record["metrics"]
    # Measured 78.27% -> 92.76% (281 -> 333 of digits' 359 test images; CPU, 2026-12-01); two images of margin.
    assert metrics["test_accuracy_original_labels"] >= 279 / 359 and metrics["test_accuracy"] >= 331 / 359
    assert metrics["test_accuracy"] > metrics["test_accuracy_original_labels"] + 0.12
    assert record["selection"]["split"] == "none"  # Label Solve selects nothing: no validation split needed
    assert len(record["curves"]["label_covariance"]) == 10
    assert load_distilled(out / "distilled.npz").metadata["method"] == "label_solve"
    assert (out / "label_covariance.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["label-solve", "--dataset", "digits", "--support-size", "15", "--no-progress"]) == 2
    assert "multiple of 10" in capsys.readouterr().err


def test_validation_images_are_neither_support_nor_targets(tmp_path):
    from kernel_distill.data import load_dataset, validation_split

    out = tmp_path / "ls"
    assert main([*LS_ARGS, "--val-size", "100", "--out", str(out)]) == 0
    record = read_results(out)
    assert record["metrics"]["num_train"] == 1438 - 100 and record["config"]["val_size"] == 100
    raw, labels = load_dataset("digits", "train", progress=False)
    _, val_idx = validation_split(labels, 100, 10)
    support = load_distilled(out / "distilled.npz")
    data = prepare_dataset("digits", progress=False, val_size=100)
    flat_val = data.x_val.reshape(len(data.x_val), -1)
    for image in support.images.reshape(len(support.images), -1):
        assert not np.any(np.all(np.isclose(flat_val, image), axis=1))


def test_chunked_pass_continued_from_its_running_sums_is_bit_identical(x64, problem):
    """Sums handed to ``on_chunk`` and given back as ``start`` continue the pass: the same bits as one pass."""
    x_support, x_train, y_train = problem
    kernel_fn = make_kernel_fn(architecture="fc", depth=2)
    seen = []
    whole = solve_labels(kernel_fn, x_support, x_train, y_train, block_size=4, chunk_blocks=3, progress=False,
                         on_chunk=seen.append)
    assert [s.count for s in seen] == [12, 24, 36, 41]
    continued = solve_labels(kernel_fn, x_support, x_train, y_train, block_size=4, chunk_blocks=3, progress=False,
                             start=seen[1])
    np.testing.assert_array_equal(continued.gram, whole.gram)
    np.testing.assert_array_equal(continued.labels, whole.labels)
    one_chunk = solve_labels(kernel_fn, x_support, x_train, y_train, block_size=4, progress=False)
    np.testing.assert_allclose(whole.gram, one_chunk.gram, rtol=1e-12)  # chunks change only the rounding
    with pytest.raises(KernelDistillError, match="do not end a chunk"):
        solve_labels(kernel_fn, x_support, x_train, y_train, block_size=4, chunk_blocks=2, progress=False,
                     start=seen[0])


LS_ARGS = ["label-solve", "--dataset", "digits", "--support-size", "20", "--block-size", "200", "--no-progress"]


def test_resume_after_an_interrupt_gives_the_labels_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from kernel_distill.workflows import label_solve as workflow

    assert main([*LS_ARGS, "--out", str(tmp_path / "whole")]) == 0
    save = workflow.save_checkpoint

    def interrupted_after_three(folder, sums, *rest):
        save(folder, sums, *rest)
        if sums.count == 600:  # 3 blocks of 200 of digits' 1,438 training images (Ctrl-C, SIGTERM)
            raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_checkpoint", interrupted_after_three)
    cut = tmp_path / "cut"
    assert main([*LS_ARGS, "--out", str(cut)]) == 130
    assert not (cut / "results.json").exists()
    (cut / ".distilled.npz.1234.tmp").write_bytes(b"half a write")  # left by a kill during a write
    monkeypatch.setattr(workflow, "save_checkpoint", save)
    assert main(["label-solve", "--resume", str(cut), "--no-progress"]) == 0
    whole, resumed = load_distilled(tmp_path / "whole" / "distilled.npz"), load_distilled(cut / "distilled.npz")
    np.testing.assert_array_equal(resumed.labels, whole.labels)
    np.testing.assert_array_equal(resumed.images, whole.images)
    record = read_results(cut)
    assert record["config"]["resumed_from_rows"] == 600 and record["metrics"]["num_train"] == 1438
    assert record["metrics"]["test_accuracy"] == read_results(tmp_path / "whole")["metrics"]["test_accuracy"]
    events = [json.loads(line)["event"] for line in (cut / "config_history.jsonl").read_text().splitlines()]
    assert events == ["start", "resume"]


def test_resume_refuses_what_would_change_the_result(tmp_path, monkeypatch, capsys):
    from kernel_distill.workflows import label_solve as workflow

    save = workflow.save_checkpoint

    def interrupted_at_once(folder, sums, *rest):
        save(folder, sums, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_checkpoint", interrupted_at_once)
    cut = tmp_path / "cut"
    assert main([*LS_ARGS, "--out", str(cut)]) == 130
    capsys.readouterr()
    for extra, needle in ((["--block-size", "100"], "--block-size would change block_size from 200 to 100"),
                          (["--ls-reg", "1e-3"], "--ls-reg would change"),
                          (["--kernel", "convnet"], "--kernel would change"),
                          (["--out", str(tmp_path / "x")], "--out cannot be used with --resume")):
        assert main(["label-solve", "--resume", str(cut), *extra]) == 2
        assert needle in capsys.readouterr().err
    with np.load(cut / workflow.CHECKPOINT) as f:
        arrays = dict(f)
    arrays["support"] = arrays["support"] + 1.0  # the folder's sums were made with other images
    np.savez(cut / workflow.CHECKPOINT, **arrays)
    monkeypatch.setattr(workflow, "save_checkpoint", save)
    assert main(["label-solve", "--resume", str(cut), "--no-progress"]) == 2
    assert "the support images differ" in capsys.readouterr().err
    assert main(["label-solve", "--resume", str(tmp_path / "nothing")]) == 2
    (tmp_path / "kip-like").mkdir()
    assert main(["label-solve", "--resume", str(tmp_path / "kip-like")]) == 2
    assert "not a label-solve run folder" in capsys.readouterr().err
