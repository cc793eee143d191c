"""The results schema and the validation split that KIP selects on."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest

from kernel_distill.data import prepare_dataset, validation_split
from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelSpec
from kernel_distill.kip import KipConfig, check_feasible, prepare_for
from kernel_distill.results import make_record, read_records, split_checksum, validate_record


def _record(**overrides):
    record = make_record("baseline", "natural", dict(name="digits", checksums={}), dict(test_accuracy=0.9),
                         dict(per_class=1), argv=["kernel-distill", "baseline"])
    record.update(overrides)
    return record


def test_a_record_has_provenance_and_round_trips(tmp_path):
    record = _record()
    prov = record["provenance"]
    assert prov["command_line"] == "kernel-distill baseline" and prov["dtype"] == "float32"
    assert prov["jax_version"] and prov["date"].endswith("Z")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert read_records(path) == [record, record]


def test_a_record_names_the_commit_of_the_checkout_it_runs_from():
    """In a git checkout the record carries ``git rev-parse HEAD`` of the package's checkout (skipped only
    where the package does not run from a git checkout, e.g. an installed wheel)."""
    import kernel_distill
    from kernel_distill import results

    root = pathlib.Path(kernel_distill.__file__).resolve().parents[2]
    try:
        top, head = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError, ValueError):
        top = head = None
    if top is None or pathlib.Path(top).resolve() != root:  # e.g. a wheel installed in a venv in some repo
        pytest.skip(f"the package does not run from the root of a git checkout ({root})")
    results._git_state.cache_clear()  # cached per process: an earlier test may have read an older HEAD
    prov = _record()["provenance"]
    assert prov["git_commit"] == head and len(head) == 40
    assert isinstance(prov["git_dirty"], bool)


@pytest.mark.parametrize("change,match", [
    (dict(schema_version=99), "version"),
    (dict(selection=dict(split="train")), "selection split"),
    (dict(metrics=dict(test_accuracy=97.2)), "not a fraction"),
    (dict(provenance=dict(date="today")), "provenance lacks"),
])
def test_records_that_break_the_schema_are_refused(change, match):
    with pytest.raises(KernelDistillError, match=match):
        validate_record(_record(**change))


def test_checksum_sees_pixels_and_labels():
    x, y = np.zeros((4, 2, 2, 1), np.uint8), np.arange(4)
    base = split_checksum(x, y)
    x2 = x.copy()
    x2[0, 0, 0, 0] = 1
    assert split_checksum(x2, y) != base and split_checksum(x, y[::-1].copy()) != base
    assert split_checksum(x.copy(), y.copy()) == base


def test_validation_split_is_class_balanced_disjoint_and_fixed():
    y = np.repeat(np.arange(3), [10, 12, 9])
    train, val = validation_split(y, 6, 3)
    assert np.bincount(y[val]).tolist() == [2, 2, 2]
    assert set(train) | set(val) == set(range(len(y))) and not set(train) & set(val)
    assert np.array_equal(validation_split(y, 6, 3)[1], val)  # independent of any run's seed
    with pytest.raises(KernelDistillError, match="multiple of 3"):
        validation_split(y, 5, 3)
    with pytest.raises(KernelDistillError, match="smallest class"):
        validation_split(y, 27, 3)


def test_kip_targets_never_include_the_validation_images():
    """KIP draws targets (and its initial support) from ``x_train`` only, which is train minus validation."""
    data = prepare_for(KipConfig(dataset="digits"), progress=False)
    whole = prepare_dataset("digits", progress=False, val_size=0)
    train_idx, val_idx = validation_split(whole.y_train, 200, 10)
    assert data.num_val == 200 and len(data.y_train) == 1438 - 200
    np.testing.assert_array_equal(data.raw_train, whole.raw_train[train_idx])
    np.testing.assert_array_equal(data.y_val, whole.y_train[val_idx])
    np.testing.assert_allclose(data.x_val, data.preprocessor.apply(whole.raw_train[val_idx]), rtol=1e-6)
    assert data.checksums == whole.checksums  # the checksum is of the files, before the split


def test_kip_refuses_data_without_its_validation_split_and_old_runs_selected_on_test():
    config = KipConfig(dataset="digits", kernel=KernelSpec("fc"))
    with pytest.raises(KernelDistillError, match="validation images"):
        check_feasible(config, prepare_dataset("digits", progress=False))
    with pytest.raises(KernelDistillError, match="--val-size above 0"):
        KipConfig(val_size=0)
    assert KipConfig(select_on="test").effective_val_size == 0
    old = KipConfig().to_dict()
    del old["select_on"], old["val_size"]
    assert KipConfig.from_dict(old).select_on == "test"  # written before validation splits existed


@pytest.mark.parametrize("select_on", ["validation", "test"])
def test_kip_selects_the_best_step_on_the_chosen_split(tmp_path, select_on):
    from kernel_distill.io import load_distilled
    from kernel_distill.kip import run_kip
    from kernel_distill.results import read_results

    config = KipConfig(dataset="digits", per_class=1, learn_labels=True, target_batch_size=200, steps=12,
                       eval_every=3, checkpoint_every=12, log_every=3, select_on=select_on, learning_rate=0.05)
    run_kip(config, prepare_for(config, progress=False), tmp_path, progress=False)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "test_accuracy" in r]
    key = "val_accuracy" if select_on == "validation" else "test_accuracy"
    assert all(("val_accuracy" in r) == (select_on == "validation") for r in evals)  # test selection: no val
    best = max(evals, key=lambda r: r[key])  # the first maximum, as the run keeps the first
    record = read_results(tmp_path)
    assert record["selection"] == dict(split=select_on, val_size=200 if select_on == "validation" else 0,
                                       step=best["step"], accuracy=best[key])
    assert record["metrics"]["test_accuracy"] == best["test_accuracy"]
    assert record["metrics"]["test_accuracy_final"] == evals[-1]["test_accuracy"]
    meta = load_distilled(tmp_path / "distilled_best.npz").metadata
    assert meta["selection"]["split"] == select_on and meta["step"] == best["step"]
