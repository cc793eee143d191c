"""Run folders: one run per folder, an OS lock, strict resume with a history, and bit-exact resume after kill -9."""

from __future__ import annotations

import fcntl
import json
import os
import stat

import pytest
from reliability_cases import (LONG_ARGS, kill_and_resume, kill_during_final_writes, make_reference_run,
                               two_runs_at_once)

from kernel_distill import runs
from kernel_distill.cli import main
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import load_distilled
from kernel_distill.kip import RESUMABLE_FIELDS, KipConfig, config_flag

ARGS = LONG_ARGS


def _kip(*argv) -> int:
    return main(["kip", *map(str, argv)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_reference_run(tmp_path_factory.mktemp("reference") / "run")


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path, reference):
    result = kill_and_resume(tmp_path / "run", reference)
    assert result["killed"][0] and sum(result["killed"]) >= 2, f"kill points reached: {result['killed']}"
    assert result["stale_temp_left"] == []
    assert result["differences"] == []
    history = runs.read_history(tmp_path / "run")
    assert history[0]["event"] == "start" and all(r["event"] == "resume" for r in history[1:])



@pytest.mark.slow
def test_a_run_killed_during_its_final_writes_is_finished_by_resume(tmp_path, reference):
    """kill -9 after the last checkpoint, during the writes of distilled.npz ... results.json: ``--resume``
    completes the outputs without a new step (it used to say "nothing to do" and the outputs were lost)."""
    result = kill_during_final_writes(tmp_path / "run", reference)
    assert result["killed"], "the run ended before the kill point"
    assert "results.json" not in result["outputs_before"] and result["step_before"] == 60
    assert result["exit_code"] == 0, result["stderr"]
    assert result["results_steps"] == 60 and result["resumed_at"] == 60  # no step taken after the kill
    assert result["differences"] == []
    for name in ("distilled.npz", "distilled_best.npz", "grid.png", "curve.png", "results.json"):
        assert (tmp_path / "run" / name).is_file(), name
    # Once complete, a second resume has nothing to do.
    with pytest.raises(KernelDistillError, match="nothing to do"):
        from kernel_distill.kip import check_resume, load_checkpoint

        check_resume(tmp_path / "run", load_checkpoint(tmp_path / "run")[0])

@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder(tmp_path, reference):
    result = two_runs_at_once(tmp_path / "run", reference)
    assert result["codes"] == [0, 2], result
    refusal = result["refusal"]
    assert "\n" not in refusal and ("in use by another kernel-distill run (pid" in refusal or "is not empty" in refusal)
    assert result["differences"] == []  # the winner's run, not a mixture


def test_a_held_lock_refuses_a_second_run_with_the_holders_pid(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    with open(folder / runs.LOCK_NAME, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        assert _kip("--out", folder, *ARGS) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and err.count("\n") == 1
    assert _visible(folder) == []


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != runs.LOCK_NAME)


def test_overwrite_replaces_a_run_and_history_records_each_resume(tmp_path, capsys):
    folder = tmp_path / "run"
    short = ["--per-class", "1", "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--target-batch",
             "100", "--no-progress"]
    assert _kip("--out", folder, *short) == 0
    assert _kip("--out", folder, *short) == 2 and "--overwrite" in capsys.readouterr().err
    assert _kip("--out", folder, *short, "--seed", "3", "--overwrite") == 0
    assert _kip("--resume", folder, "--steps", "6", "--eval-every", "3", "--no-progress") == 0
    history = runs.read_history(folder)
    assert [r["event"] for r in history] == ["start", "resume"]
    assert history[0]["config"]["seed"] == 3
    assert history[1]["step"] == 4 and history[1]["changes"] == {"eval_every": [2, 3], "steps": [4, 6]}
    meta = load_distilled(folder / "distilled.npz").metadata
    assert meta["config"]["seed"] == 3 and [r["event"] for r in meta["config_history"]] == ["start", "resume"]
    # Files are written with the usual permissions (umask), not mkstemp's 0600.
    mask = os.umask(0)
    os.umask(mask)
    for name in ("distilled.npz", "checkpoint.npz", "config.json", "metrics.jsonl"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~mask, name


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, dict):
        return {k: _perturbed(v) for k, v in value.items()}
    return 1  # None


def test_every_result_changing_field_is_compared_on_resume():
    """Generic over KipConfig's fields: a field added later is refused on resume without touching this test."""
    saved = KipConfig().to_dict()
    flat = runs._flatten(saved)
    for name in flat:
        requested = json.loads(json.dumps(saved))
        parts = name.split(".")
        target = requested
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = _perturbed(target[parts[-1]])
        if name in RESUMABLE_FIELDS:
            assert runs.resume_changes(saved, requested, RESUMABLE_FIELDS, config_flag) == \
                {name: [flat[name], target[parts[-1]]]}
        else:
            with pytest.raises(KernelDistillError, match=f"{config_flag(name)} would change {name}"):
                runs.resume_changes(saved, requested, RESUMABLE_FIELDS, config_flag)
    with pytest.raises(KernelDistillError, match="--val-size would change val_size"):  # a field a newer version adds
        runs.resume_changes(saved, dict(saved, val_size=100), RESUMABLE_FIELDS, config_flag)


def test_a_run_refused_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new"
    assert _kip("--out", out, "--per-class", "1000", "--no-progress") == 2  # refused after the folder was claimed
    assert "larger than the smallest class" in capsys.readouterr().err
    assert not out.exists()
