"""docs/BENCHMARKS.md is generated from benchmarks/results/*.jsonl by benchmarks/tables.py, and is up to date."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import pytest

from kernel_distill.results import make_record, read_records

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tables():
    spec = importlib.util.spec_from_file_location("tables", REPO / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_document_matches_the_result_files(tables, capsys):
    assert tables.main(["--check"]) == 0, "run .venv/bin/python benchmarks/tables.py and commit docs/BENCHMARKS.md"
    for path in (REPO / "benchmarks" / "results").glob("*.jsonl"):
        assert read_records(path)  # every committed record follows the schema


def test_a_measured_record_replaces_a_transcribed_one(tables, tmp_path, monkeypatch):
    shutil.copy(REPO / "benchmarks" / "results" / "kip_fc.jsonl", tmp_path / "kip_fc.jsonl")
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    before = tables.render_kip_fc()
    old = read_records(tmp_path / "kip_fc.jsonl")[0]  # MNIST 1/class learned, selected on test
    new = make_record("kip", "kip", dict(old["dataset"]), dict(old["metrics"], test_accuracy=0.5),
                      dict(old["config"], select_on="validation"),
                      selection=dict(split="validation", val_size=5000, step=100, accuracy=0.6), wall_seconds=12.0)
    with open(tmp_path / "kip_fc.jsonl", "a") as f:
        f.write(json.dumps(new) + "\n")
    after = tables.render_kip_fc()
    assert "90.02 (2000, on TEST)" in before and "90.02 (2000, on TEST)" not in after
    assert "50.00 (100, on validation)" in after and "measured" in after
    assert after.count("\n| MNIST | 1 | learned") == 1


def test_transfer_tables_show_the_gain_over_the_random_subset_and_the_other_loss(tables, tmp_path, monkeypatch):
    """The gain column is the set's accuracy minus the natural (random class-balanced) subset's under the
    same recipe, the hard-label column is the CE record of the same set, storage is images + labels."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path)

    def record(set_name, loss, accuracy):
        return make_record("benchmark/transfer", "transfer", dict(name="mnist", checksums={}),
                           dict(test_accuracy=accuracy, test_accuracy_std=0.01, support_size=10, num_test=10000,
                                train_seconds_per_seed=3.0, **({"make_seconds": 42.0} if set_name == "ls" else {})),
                           dict(model="evalnet", set=set_name, per_class=1, loss=loss), wall_seconds=1.0)

    with open(tmp_path / "transfer.jsonl", "w") as f:
        for set_name, loss, accuracy in [("kip-fc", "mse", 0.25), ("ls", "mse", 0.625), ("natural", "mse", 0.5),
                                         ("ls", "ce", 0.55)]:
            f.write(json.dumps(record(set_name, loss, accuracy)) + "\n")
    row = [line for line in tables._transfer("evalnet", "mse", with_krr=False).splitlines()
           if line.startswith("| MNIST")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[5] == "-25.00 / +12.50"  # KIP-FC 25 - 50, LS 62.5 - 50
    assert cells[6] == "- / 55.00"  # only the LS set was trained with hard labels
    assert cells[7] == f"{10 * (784 + 10) * 4 / 1000:,.0f} kB"
    assert cells[8] == "- / 42"


def test_the_kip_defaults_table_marks_the_best_validation_point_and_breaks_ties_toward_the_cheaper_one(
        tables, tmp_path, monkeypatch):
    """The rule of benchmarks/kip_defaults.py: highest validation accuracy of the selected support picks the
    default (test accuracy never does); equal validation goes to the smaller depth, then the smaller lr."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path)

    def record(depth, lr, val, test):
        config = dict(per_class=10, steps=6000, kernel=dict(architecture="fc", depth=depth), learning_rate=lr,
                      target_batch_size=5000, learn_labels=True)
        metrics = dict(test_accuracy=test, test_accuracy_final=test, val_accuracy_best=val, best_step=5500)
        return make_record("kip", "kip", dict(name="mnist", checksums={}), metrics, config, wall_seconds=1.0)

    grid = [record(1, 0.01, 0.95, 0.99), record(3, 0.01, 0.97, 0.90), record(2, 0.04, 0.97, 0.91),
            record(2, 0.01, 0.97, 0.92)]
    with open(tmp_path / "kip_defaults.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in grid)
    rows = [line for line in tables.render_kip_defaults().splitlines() if line.startswith("| MNIST")]
    chosen = [line for line in rows if "**chosen**" in line]
    assert len(rows) == 4 and len(chosen) == 1
    assert chosen[0].startswith("| MNIST | 10 | 6000 | 2 | 0.01 | 5000 | 97.00 | 5500 | 92.00 |")
