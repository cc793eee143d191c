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
