"""The command line: real runs on digits, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kernel_distill.cli import main
from kernel_distill.results import read_results


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_baseline_then_evaluate_round_trip(tmp_path, capsys):
    code, out, _ = run(capsys, "baseline", "--dataset", "digits", "--per-class", "5", "--seeds", "2",
                       "--no-progress", "--json", "--out", str(tmp_path / "base"))
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == read_results(tmp_path / "base")  # --json prints the record results.json holds
    metrics = summary["metrics"]
    assert len(metrics["test_accuracies"]) == 2 and 0.5 < metrics["test_accuracy"] <= 1
    assert metrics["test_accuracy"] == pytest.approx(np.mean(metrics["test_accuracies"]))
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "base" / "natural.npz"), "--dataset", "digits",
                       "--no-progress", "--json", "--out", str(tmp_path / "eval"))
    assert code == 0
    evaluated = read_results(tmp_path / "eval")
    assert evaluated["metrics"]["test_accuracy"] == pytest.approx(metrics["test_accuracies"][0])
    # Both read the same test split, so their checksums agree; the baseline also read the training split.
    assert evaluated["dataset"]["checksums"]["test"] == summary["dataset"]["checksums"]["test"]
    assert set(summary["dataset"]["checksums"]) == {"train", "test"}
    for record, command in ((summary, "baseline"), (evaluated, "evaluate")):
        assert record["command"] == command and record["selection"]["split"] == "none"
        assert command in record["provenance"]["command_line"]


def test_evaluate_with_a_conv_kernel(tmp_path, capsys):
    out_file = tmp_path / "natural.npz"
    assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1", "--no-progress",
               "--out", str(tmp_path))[0] == 0
    code, out, _ = run(capsys, "evaluate", str(out_file), "--dataset", "digits", "--kernel", "convnet",
                       "--get", "nngp", "--test-limit", "40", "--no-progress")
    assert code == 0 and "convnet NNGP" in out and "40 digits test images" in out


def test_released_kip_file_is_evaluated_with_refitted_preprocessing(tmp_path, capsys, rng):
    path = tmp_path / "kip.npz"
    np.savez(path, images=rng.normal(size=(10, 8, 8, 1)).astype(np.float32),
             labels=(np.eye(10) - 0.1).astype(np.float32))
    code, out, _ = run(capsys, "evaluate", str(path), "--dataset", "digits", "--no-progress")
    assert code == 0 and "carries no preprocessing" in out


def test_datasets_lists_everything(capsys):
    code, out, _ = run(capsys, "datasets")
    assert code == 0
    for name in ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"):
        assert name in out


@pytest.mark.parametrize("argv,match", [
    (["evaluate", "missing.npz", "--dataset", "digits"], "no such file"),
    (["baseline", "--dataset", "imagenet"], "unknown dataset"),
    (["baseline", "--dataset", "digits", "--per-class", "500"], "fewer than the 500"),
    (["baseline", "--dataset", "digits", "--per-class", "0"], "positive integer"),
    (["baseline", "--dataset", "digits", "--kernel", "convnet", "--depth", "5"], "at least 32x32"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, match):
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kernel-distill: error:") and match in err


@pytest.mark.parametrize("argv", [["kip", "--kernel", "resnet"], ["baseline"], ["frobnicate"],
                                  ["kip", "--per-class", "ten"]])
def test_argument_errors_are_one_line_too(capsys, argv):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and err.count("\n") == 1 and err.startswith("kernel-distill: error:")


def test_unreachable_download_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "baseline", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "download of" in err and str(tmp_path / "mnist") in err


def test_mismatched_file_and_dataset(tmp_path, capsys, rng):
    path = tmp_path / "wrong.npz"
    np.savez(path, images=rng.normal(size=(3, 28, 28, 1)).astype(np.float32), labels=np.zeros((3, 10), np.float32))
    code, _, err = run(capsys, "evaluate", str(path), "--dataset", "digits")
    assert code == 2 and "images of shape" in err


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "kernel_distill.cli", "evaluate", str(bad), "--dataset", "digits"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not a readable .npz" in proc.stderr
