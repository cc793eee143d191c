"""The GPU campaign script at toy size on the CPU: stages run under their deadlines and records are written."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _campaign():
    spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "benchmarks" / "gpu_campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_campaign_writes_a_record_per_stage_and_stops_kip_at_its_deadline(tmp_path):
    out = tmp_path / "campaign"
    assert _campaign().main(["--toy", "--out", str(out), "--budget-seconds", "40", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "campaign.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert stages[0] == "start" and stages[-1] == "end" and "label-solve" in stages and "kip" in stages
    assert records[0]["machine"]["platform"] == "cpu" and records[0]["plan"]["dataset"] == "digits"
    solved = records[stages.index("label-solve")]
    assert solved["status"] == "finished", solved
    metrics = solved["result"]["metrics"]
    assert metrics["num_train"] == 1438 - 100  # the validation images are never targets
    assert metrics["test_accuracy"] > metrics["test_accuracy_original_labels"]
    kip = records[stages.index("kip")]
    # 100,000 steps never fit: KIP is interrupted at its deadline and still leaves its sets and record
    assert kip["status"] == "stopped at the deadline", kip
    assert kip["seconds"] <= kip["budget_seconds"] + 30
    assert (out / "kip" / "distilled_best.npz").is_file() and (out / "kip" / "checkpoint.npz").is_file()
    progress = records[stages.index("kip progress")]
    assert progress["selection"]["split"] == "validation" and progress["metrics"]["steps"] >= 1
