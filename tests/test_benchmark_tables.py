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
