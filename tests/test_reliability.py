"""Every bad input of ``reliability_cases.CASES`` ends in one line and exit code 2, with no file lost or changed."""

from __future__ import annotations

import pytest

from reliability_cases import CASES, make_finished_run, run_case


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_finished_run(tmp_path_factory.mktemp("reliability") / "template")


def test_the_table_covers_every_command_with_at_least_40_cases():
    commands = {case.command for case in CASES}
    assert len(CASES) >= 40
    assert commands >= {"evaluate", "transfer", "baseline", "label-solve", "kip"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.name}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, template, tmp_path):
    outcome = run_case(case, template, tmp_path / "case")
    assert outcome.traceback is None, outcome.traceback
    assert outcome.exit_code == 2, outcome.stderr
    assert outcome.one_line, outcome.stderr
    assert case.match in outcome.stderr, outcome.stderr
    assert outcome.files_unchanged and outcome.check_passed, "a file that was there changed"
    assert case.may_add or not outcome.new_files, outcome.new_files


def test_a_files_dataset_and_preprocessing_are_honoured_everywhere(tmp_path, capsys):
    """A ZCA set: evaluate (no --dataset: the file's) and label-solve --support score it in its own space."""
    import json

    from kernel_distill.cli import main

    assert main(["baseline", "--dataset", "digits", "--per-class", "5", "--seeds", "1", "--zca", "--out",
                 str(tmp_path / "natural"), "--no-progress", "--json"]) == 0
    natural = _json_line(capsys)["metrics"]["test_accuracies"][0]
    path = tmp_path / "natural" / "natural.npz"
    assert main(["evaluate", str(path), "--no-progress", "--json"]) == 0
    assert _json_line(capsys)["metrics"]["test_accuracy"] == \
        pytest.approx(natural)
    assert main(["label-solve", "--dataset", "digits", "--support", str(path), "--out", str(tmp_path / "ls"),
                 "--no-progress", "--json"]) == 0
    metrics = _json_line(capsys)["metrics"]
    # Scored on test images mapped with the file's ZCA, the original labels give the file's own accuracy.
    assert metrics["test_accuracy_original_labels"] == pytest.approx(natural, abs=1e-6)


def _json_line(capsys) -> dict:
    import json

    return json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
