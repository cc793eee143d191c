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
    # measured 87.74% and 87.47% (2026-12-01): five natural images per class of digits, FC NTK
    assert len(metrics["test_accuracies"]) == 2 and 0.85 < metrics["test_accuracy"] < 0.90
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


def test_a_version_1_file_reads_and_evaluates_like_its_current_copy(tmp_path, capsys):
    """A file laid out as the version-1 writer did (``format_version`` 1, no ``kernel_layers``) keeps working:
    same arrays, same preprocessing, the same KRR accuracy as the file this version writes from it."""
    assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "3", "--seeds", "1", "--no-progress",
               "--out", str(tmp_path / "base"))[0] == 0
    current = tmp_path / "base" / "natural.npz"
    with np.load(current) as f:
        arrays = {k: f[k] for k in f.files}
    metadata = json.loads(str(arrays.pop("metadata")))
    assert metadata["format_version"] == 2 and "kernel_layers" in metadata
    del metadata["kernel_layers"]
    metadata["format_version"] = 1
    version_1 = tmp_path / "v1.npz"
    np.savez(version_1, metadata=np.array(json.dumps(metadata, sort_keys=True)), **arrays)

    from kernel_distill.io import load_distilled

    old, new = load_distilled(version_1), load_distilled(current)
    np.testing.assert_array_equal(old.images, new.images)
    np.testing.assert_array_equal(old.labels, new.labels)
    np.testing.assert_array_equal(old.preprocessor.mean, new.preprocessor.mean)
    np.testing.assert_array_equal(old.preprocessor.std, new.preprocessor.std)
    assert old.metadata["format_version"] == 1 and old.metadata["kernel"] == new.metadata["kernel"]
    accuracies = []
    for path in (version_1, current):
        code, out, _ = run(capsys, "evaluate", str(path), "--dataset", "digits", "--no-progress", "--json")
        assert code == 0
        accuracies.append(json.loads(out.strip().splitlines()[-1])["metrics"]["test_accuracy"])
    assert accuracies[0] == accuracies[1] and 0.5 < accuracies[0] <= 1.0


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
    assert not (tmp_path / "mnist").exists()  # a failed first download leaves no empty dataset folder


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


def test_every_option_of_every_command_has_help_text():
    import argparse

    from kernel_distill.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), ["kernel-distill"])
    assert missing == []


def test_overwrite_replaces_only_an_earlier_run_of_the_same_command(tmp_path, capsys):
    """evaluate, baseline, label-solve and transfer own their folders as kip does: a second run into the same
    --out is refused, --overwrite replaces that command's own files and leaves the user's alone."""
    base = tmp_path / "base"
    assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1", "--no-progress",
               "--out", str(base))[0] == 0
    subset = str(base / "natural.npz")
    commands = {
        "evaluate": ["evaluate", subset],
        "baseline": ["baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1"],
        "label-solve": ["label-solve", "--dataset", "digits", "--support-size", "20", "--train-limit", "300"],
        "transfer": ["transfer", subset, "--model", "fc", "--width", "16", "--steps", "3", "--seeds", "1",
                     "--eval-every", "3"],
    }
    for command, argv in commands.items():
        out = tmp_path / command
        assert run(capsys, *argv, "--no-progress", "--out", str(out))[0] == 0
        (out / "notes.txt").write_text("mine\n")
        first = (out / "results.json").read_text()
        code, _, err = run(capsys, *argv, "--no-progress", "--out", str(out))
        assert code == 2 and "is not empty" in err and (out / "results.json").read_text() == first, command
        assert run(capsys, *argv, "--no-progress", "--out", str(out), "--overwrite")[0] == 0
        assert (out / "results.json").read_text() != first  # a new record (its date and wall time at least)
        assert read_results(out)["command"] == command
        assert (out / "notes.txt").read_text() == "mine\n"


def test_a_ranking_rerun_with_its_runs_file_trains_no_network_again(tmp_path, capsys):
    """``transfer --ranking --ranking-runs F``: the transfer's own seed and the ranking's runs all go into F as
    they finish; the same command again takes every one from F (nothing trained, F unchanged)."""
    base = tmp_path / "base"
    assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1", "--no-progress",
               "--out", str(base))[0] == 0
    runs = tmp_path / "runs.jsonl"
    argv = ["transfer", str(base / "natural.npz"), "--model", "fc", "--width", "16", "--steps", "3", "--seeds", "1",
            "--eval-every", "3", "--ranking", "--ranking-runs", str(runs), "--no-progress"]
    code, first, _ = run(capsys, *argv)
    lines = runs.read_text().splitlines()
    # one-hot labels: no set_natural_labels; the transfer's seed is the ranking's `set` run
    assert code == 0 and len(lines) == 6 and sum('"variant": "set"' in line for line in lines) == 1
    code, again, _ = run(capsys, *argv)
    assert code == 0 and runs.read_text().splitlines() == lines
    assert "1 of 1 seeds reused" in again and "ranking: 6 runs reused" in again

    def scores(out):  # the transfer's accuracy line and the ranking's two lines, without the timings
        import re

        return [re.sub(r"\(\d+ s training, \d+ s testing\)", "", line) for line in out.splitlines()
                if "test accuracy" in line or "DD-Ranking" in line]

    assert scores(again) == scores(first) and len(scores(first)) == 3 and "IOR" in scores(first)[1]


def test_report_overwrite_replaces_an_earlier_report_whole(tmp_path, capsys):
    for name in ("a", "b"):
        assert run(capsys, "baseline", "--dataset", "digits", "--per-class", "2", "--seeds", "1", "--no-progress",
                   "--out", str(tmp_path / "runs" / name))[0] == 0
    report = tmp_path / "report"
    assert run(capsys, "report", str(tmp_path / "runs"), "--out", str(report))[0] == 0
    assert len(list((report / "runs").glob("*.html"))) == 2
    code, _, err = run(capsys, "report", str(tmp_path / "runs" / "a"), "--out", str(report))
    assert code == 2 and "is not empty" in err
    assert run(capsys, "report", str(tmp_path / "runs" / "a"), "--out", str(report), "--overwrite")[0] == 0
    assert len(list((report / "runs").glob("*.html"))) == 1  # no page left over from the earlier report
    assert not list(report.glob(".report-*"))  # the staging folder is gone


def test_zoo_export_overwrite_replaces_a_plain_file(tmp_path, capsys):
    target = tmp_path / "set.npz"
    target.write_bytes(b"an old file")
    code, _, err = run(capsys, "zoo", "export", "mnist-kip-fc-1ipc", str(target))
    assert code == 2 and "exists" in err and target.read_bytes() == b"an old file"
    assert run(capsys, "zoo", "export", "mnist-kip-fc-1ipc", str(target), "--overwrite")[0] == 0
    from kernel_distill import zoo

    assert zoo.file_sha256(target) == zoo.entry("mnist-kip-fc-1ipc")["sha256"]


def test_datasets_says_unreadable_for_a_corrupt_split(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    np.savez_compressed(folder / "train.npz", x=np.zeros((20, 28, 28, 1), np.uint8), y=np.zeros(20, np.uint8))
    np.savez_compressed(folder / "test.npz", x=np.zeros((20, 28, 28, 1), np.uint8), y=np.zeros(20, np.uint8))
    code, out, _ = run(capsys, "datasets", "--data-dir", str(tmp_path))
    assert code == 0 and "ready (npz)" in out
    data = bytearray((folder / "train.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside the compressed x array
    (folder / "train.npz").write_bytes(bytes(data))
    code, out, _ = run(capsys, "datasets", "--data-dir", str(tmp_path))
    line = next(line for line in out.splitlines() if line.strip().startswith("mnist"))
    assert code == 0 and "UNREADABLE" in line and "train.npz" in line


def test_ranking_runs_file_goes_with_ranking(tmp_path, capsys):
    code, _, err = run(capsys, "transfer", "zoo:mnist-kip-fc-1ipc", "--ranking-runs", str(tmp_path / "runs.jsonl"))
    assert code == 2 and err.count("\n") == 1 and "--ranking-runs" in err and "--ranking" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code, _, err = run(capsys, "transfer", "zoo:mnist-kip-fc-1ipc", "--ranking", "--ranking-runs", str(bad))
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl:1: not a run" in err
