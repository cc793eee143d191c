"""Bad inputs for every command, and the runner that checks how each one ends.

Shared by ``tests/test_reliability.py`` (asserts every case) and ``tools/reliability_report.py`` (writes
``docs/RELIABILITY.md`` from the same table). Each case runs the CLI in-process in its own folder, which
holds a finished KIP run (``run/``, 6 steps on digits), a valid distilled set (``set.npz``), a plain file
(``F``) and whatever the case's ``setup`` adds. A case passes when the command

* exits with code 2 (argparse errors included),
* prints exactly one line on stderr, starting ``kernel-distill: error:`` and containing ``match``,
* raises nothing (no traceback), and
* leaves every file that was there byte-for-byte unchanged (the lock file, which holds the pid of its
  last holder, excepted), adding none but a lock file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable

import numpy as np

from kernel_distill.cli import main
from kernel_distill.runs import LOCK_NAME

RUN_ARGS = ["--per-class", "2", "--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--target-batch",
            "100", "--no-progress"]


@dataclasses.dataclass(frozen=True)
class Case:
    command: str
    name: str
    argv: tuple[str, ...]  # "{d}" is the case folder
    match: str
    setup: Callable[[pathlib.Path], None] | None = None
    patch: Callable[[pathlib.Path], contextlib.AbstractContextManager] | None = None
    # A run that starts and then fails may write new files; ``check`` replaces "files unchanged" where the
    # case is about what must survive (a full disk: the last checkpoint).
    may_add: bool = False
    check: Callable[[pathlib.Path], bool] | None = None


# ----------------------------------------------------------------------------------------------------
# Bad files.


def _arrays(d: pathlib.Path) -> dict:
    with np.load(d / "set.npz") as f:
        return {k: f[k] for k in f.files}


def _with(name: str, **changes):
    """Setup: write ``d/name``, a copy of ``set.npz`` with arrays replaced (``None`` deletes one)."""

    def setup(d: pathlib.Path):
        arrays = _arrays(d)
        for key, value in changes.items():
            if value is None:
                arrays.pop(key, None)
            else:
                arrays[key] = value(arrays) if callable(value) else value
        np.savez(d / name, **arrays)

    return setup


def _with_metadata(name: str, edit):
    def new_metadata(arrays):
        meta = json.loads(str(arrays["metadata"]))
        return np.array(edit(meta) if callable(edit) else edit)

    return _with(name, metadata=new_metadata)


def _write_bytes(name: str, data: bytes):
    def setup(d: pathlib.Path):
        (d / name).write_bytes(data)

    return setup


def _truncated(d: pathlib.Path):
    data = (d / "set.npz").read_bytes()
    (d / "truncated.npz").write_bytes(data[:len(data) // 2])


def _corrupt_compressed(d: pathlib.Path, name: str = "corrupt.npz"):
    """A compressed .npz whose deflate stream is damaged (zlib.error on read), its zip directory intact."""
    np.savez_compressed(d / name, **_arrays(d))
    data = bytearray((d / name).read_bytes())
    start = data.index(b"images.npy") + len("images.npy") + 40  # inside the first member's compressed bytes
    for i in range(start, start + 64):
        data[i] ^= 0xA5
    (d / name).write_bytes(bytes(data))


def _corrupt_checkpoint(d: pathlib.Path):
    path = d / "run" / "checkpoint.npz"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _npy_renamed(d: pathlib.Path):
    np.save(d / "array.npy", np.zeros((2, 8, 8, 1), np.float32))
    (d / "array.npy").rename(d / "array.npz")


def _no_checkpoint(d: pathlib.Path):
    (d / "run" / "checkpoint.npz").unlink()


def _config(text: str):
    def setup(d: pathlib.Path):
        (d / "run" / "config.json").write_text(text)

    return setup


def _config_edit(**changes):
    def setup(d: pathlib.Path):
        config = json.loads((d / "run" / "config.json").read_text())
        config.update(changes)
        (d / "run" / "config.json").write_text(json.dumps(config))

    return setup


def _bad_dataset_dir(d: pathlib.Path):
    folder = d / "data" / "mnist"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        np.savez_compressed(folder / f"{split}.npz", x=np.zeros((50, 28, 28, 1), np.uint8), y=np.zeros(50, np.int64))
        data = bytearray((folder / f"{split}.npz").read_bytes())
        for i in range(60, 120):
            data[i] ^= 0x5A
        (folder / f"{split}.npz").write_bytes(bytes(data))


@contextlib.contextmanager
def _held_lock(d: pathlib.Path):
    """Another process's lock on run/: an flock on its own open file description, as a second run would hold."""
    with open(d / "run" / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.seek(0)
        handle.truncate()
        handle.write("4242\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _disk_full_after(d: pathlib.Path, good_writes: int = 3):
    """Every atomic write after the first ``good_writes`` fails with ENOSPC (as on a full disk)."""
    import errno

    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > good_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real_fsync


def _checkpoint_at(step: int):
    def check(d: pathlib.Path) -> bool:
        from kernel_distill.kip import load_checkpoint

        return load_checkpoint(d / "run")[1].step == step

    return check


def _symlink(name: str, target: str):
    """Setup: ``d/name`` is a symbolic link to ``d/target`` (which need not exist: a dangling link)."""

    def setup(d: pathlib.Path):
        (d / name).symlink_to(d / target)

    return setup


def _previous_report(d: pathlib.Path):
    """A report folder as ``report`` leaves it (index.html, runs/, img/)."""
    (d / "rep" / "runs").mkdir(parents=True)
    (d / "rep" / "img").mkdir()
    (d / "rep" / "index.html").write_text("<html>an earlier report</html>\n")


def _previous_evaluate(d: pathlib.Path):
    """A folder holding an evaluate run's results.json."""
    record = json.loads((d / "run" / "results.json").read_text())
    (d / "ev").mkdir()
    evaluate_record = dict(record, command="evaluate", method="file", artifacts={})
    (d / "ev" / "results.json").write_text(json.dumps(evaluate_record))


def _results_edit(edit):
    """Setup: rewrite run/results.json through ``edit(record) -> record``."""

    def setup(d: pathlib.Path):
        path = d / "run" / "results.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return setup


def _metrics(**changes):
    return lambda record: dict(record, metrics=dict(record["metrics"], **changes))


def _test_split_is_a_folder(d: pathlib.Path):
    folder = d / "data" / "mnist"
    (folder / "test.npz").mkdir(parents=True)
    np.savez(folder / "train.npz", x=np.zeros((50, 28, 28, 1), np.uint8), y=np.arange(50, dtype=np.int64) % 10)


def _meta(**kwargs):
    return lambda meta: json.dumps(dict(meta, **kwargs))


D = "{d}"
SET = f"{D}/set.npz"

CASES: list[Case] = [
    # -- evaluate: files
    Case("evaluate", "file does not exist", ("evaluate", f"{D}/missing.npz", "--dataset", "digits"), "no such file"),
    Case("evaluate", "a folder instead of a file", ("evaluate", f"{D}/run", "--dataset", "digits"), "not a file"),
    Case("evaluate", "not a zip archive", ("evaluate", f"{D}/garbage.npz", "--dataset", "digits"),
         "not a readable .npz", _write_bytes("garbage.npz", b"garbage")),
    Case("evaluate", "empty file", ("evaluate", f"{D}/empty.npz", "--dataset", "digits"), "not a readable .npz",
         _write_bytes("empty.npz", b"")),
    Case("evaluate", "truncated archive", ("evaluate", f"{D}/truncated.npz", "--dataset", "digits"),
         "not a readable .npz", _truncated),
    Case("evaluate", "compressed .npz with corrupted bytes (zlib)", ("evaluate", f"{D}/corrupt.npz", "--dataset",
                                                                    "digits"), "not a readable .npz",
         _corrupt_compressed),
    Case("evaluate", ".npy renamed to .npz", ("evaluate", f"{D}/array.npz", "--dataset", "digits"),
         "not an .npz archive", _npy_renamed),
    Case("evaluate", "pickled object array", ("evaluate", f"{D}/pickled.npz", "--dataset", "digits"),
         "not a readable .npz", _with("pickled.npz", images=np.array([object()], dtype=object))),
    Case("evaluate", "labels missing", ("evaluate", f"{D}/nolabels.npz", "--dataset", "digits"), "missing array",
         _with("nolabels.npz", labels=None)),
    Case("evaluate", "integer class-id labels", ("evaluate", f"{D}/intlabels.npz", "--dataset", "digits"),
         "integer class ids", _with("intlabels.npz", labels=lambda a: np.arange(len(a["images"])) % 10)),
    Case("evaluate", "NaN in images", ("evaluate", f"{D}/nan.npz", "--dataset", "digits"), "NaN or inf",
         _with("nan.npz", images=lambda a: np.where(np.arange(a["images"].size).reshape(a["images"].shape) == 3,
                                                    np.nan, a["images"]).astype(np.float32))),
    Case("evaluate", "images not NHWC", ("evaluate", f"{D}/flat.npz", "--dataset", "digits"), "must be NHWC",
         _with("flat.npz", images=lambda a: a["images"].reshape(len(a["images"]), -1))),
    Case("evaluate", "metadata not JSON", ("evaluate", f"{D}/m1.npz", "--dataset", "digits"), "not valid JSON",
         _with("m1.npz", metadata=np.array("{not json"))),
    Case("evaluate", "metadata JSON but a list", ("evaluate", f"{D}/m2.npz", "--dataset", "digits"),
         "must be a JSON object", _with("m2.npz", metadata=np.array("[1, 2]"))),
    Case("evaluate", "metadata a number array", ("evaluate", f"{D}/m3.npz", "--dataset", "digits"),
         "must be a JSON string", _with("m3.npz", metadata=np.arange(3))),
    Case("evaluate", "metadata reg is a string", ("evaluate", f"{D}/m4.npz", "--dataset", "digits"),
         "field 'reg'", _with_metadata("m4.npz", _meta(reg="big"))),
    Case("evaluate", "metadata kernel is a string", ("evaluate", f"{D}/m5.npz", "--dataset", "digits"),
         "field 'kernel'", _with_metadata("m5.npz", _meta(kernel="fc"))),
    Case("evaluate", "metadata kernel W_std is a string", ("evaluate", f"{D}/m6.npz", "--dataset", "digits"),
         "field 'kernel'", _with_metadata("m6.npz", _meta(kernel={"architecture": "fc", "W_std": "x"}))),
    Case("evaluate", "metadata get unknown", ("evaluate", f"{D}/m7.npz", "--dataset", "digits"), "field 'get'",
         _with_metadata("m7.npz", _meta(get="rbf"))),
    Case("evaluate", "metadata zca_layer_norm not a bool", ("evaluate", f"{D}/m8.npz", "--dataset", "digits"),
         "field 'zca_layer_norm'", _with_metadata("m8.npz", _meta(zca_layer_norm="yes"))),
    Case("evaluate", "preprocess_std zero", ("evaluate", f"{D}/p1.npz", "--dataset", "digits"),
         "'preprocess_std' must be positive", _with("p1.npz", preprocess_std=np.zeros(1, np.float32))),
    Case("evaluate", "zca_matrix of the wrong shape", ("evaluate", f"{D}/p2.npz", "--dataset", "digits"),
         "'zca_matrix' must have shape", _with("p2.npz", zca_matrix=np.eye(3, dtype=np.float32))),
    Case("evaluate", "file made on mnist, --dataset digits", ("evaluate", f"{D}/mnist.npz", "--dataset", "digits"),
         "made on mnist", _with_metadata("mnist.npz", _meta(dataset="mnist"))),
    Case("evaluate", "--zca with a file preprocessed without ZCA", ("evaluate", SET, "--dataset", "digits", "--zca"),
         "--zca"),
    Case("evaluate", "--out under a file", ("evaluate", SET, "--out", f"{D}/F/out"), "is a file"),
    Case("evaluate", "--reg nan", ("evaluate", SET, "--dataset", "digits", "--reg", "nan"), "finite number"),
    Case("evaluate", "--reg -1", ("evaluate", SET, "--dataset", "digits", "--reg", "-1"), "must be >= 0"),
    Case("evaluate", "--memory-budget-mb nan", ("evaluate", SET, "--dataset", "digits", "--memory-budget-mb", "nan"),
         "finite number"),
    Case("evaluate", "--W-std inf", ("evaluate", SET, "--dataset", "digits", "--W-std", "inf"), "finite number"),
    Case("evaluate", "--test-limit 0", ("evaluate", SET, "--dataset", "digits", "--test-limit", "0"),
         "positive integer"),
    Case("evaluate", "unknown dataset (released file)", ("evaluate", f"{D}/released.npz", "--dataset", "imagenet"),
         "unknown dataset", _with("released.npz", metadata=None, preprocess_mean=None, preprocess_std=None)),
    Case("evaluate", "released file without --dataset", ("evaluate", f"{D}/released.npz"), "add --dataset",
         _with("released.npz", metadata=None, preprocess_mean=None, preprocess_std=None)),

    # -- transfer
    Case("transfer", "compressed .npz with corrupted bytes (zlib)", ("transfer", f"{D}/corrupt.npz", "--steps", "2"),
         "not a readable .npz", _corrupt_compressed),
    Case("transfer", "released file without --dataset", ("transfer", f"{D}/released.npz", "--steps", "2"),
         "add --dataset", _with("released.npz", metadata=None, preprocess_mean=None, preprocess_std=None)),
    Case("transfer", "file made on mnist, --dataset digits", ("transfer", f"{D}/mnist.npz", "--dataset", "digits",
                                                              "--steps", "2"), "made on mnist",
         _with_metadata("mnist.npz", _meta(dataset="mnist"))),
    Case("transfer", "dataset files corrupted (zlib)", ("transfer", "--natural-per-class", "1", "--dataset", "mnist",
                                                        "--data-dir", f"{D}/data"), "not a readable .npz",
         _bad_dataset_dir),
    Case("transfer", "--lr nan", ("transfer", SET, "--lr", "nan"), "finite number"),
    Case("transfer", "--weight-decay inf", ("transfer", SET, "--weight-decay", "inf"), "finite number"),
    Case("transfer", "--zca-reg 0", ("transfer", SET, "--zca-reg", "0"), "must be > 0"),
    Case("transfer", "--out under a file", ("transfer", SET, "--steps", "2", "--out", f"{D}/F/out"), "is a file"),
    # -- baseline
    Case("baseline", "--out under a file", ("baseline", "--dataset", "digits", "--out", f"{D}/F/out"), "is a file"),
    Case("baseline", "--out is a file", ("baseline", "--dataset", "digits", "--out", f"{D}/F"), "is a file"),
    Case("baseline", "--out under /proc", ("baseline", "--dataset", "digits", "--out", "/proc/kd-test"),
         "/proc/kd-test"),
    Case("baseline", "--reg inf", ("baseline", "--dataset", "digits", "--reg", "inf"), "finite number"),
    Case("baseline", "--zca-reg nan", ("baseline", "--dataset", "digits", "--zca-reg", "nan"), "finite number"),
    Case("baseline", "dataset files corrupted (zlib)", ("baseline", "--dataset", "mnist", "--data-dir",
                                                        f"{D}/data"), "not a readable .npz", _bad_dataset_dir),
    # -- label-solve
    Case("label-solve", "--support compressed with corrupted bytes (zlib)",
         ("label-solve", "--dataset", "digits", "--support", f"{D}/corrupt.npz", "--out", f"{D}/ls"),
         "not a readable .npz", _corrupt_compressed),
    Case("label-solve", "--support made on mnist", ("label-solve", "--dataset", "digits", "--support",
                                                    f"{D}/mnist.npz", "--out", f"{D}/ls"), "made on mnist",
         _with_metadata("mnist.npz", _meta(dataset="mnist"))),
    Case("label-solve", "dataset files corrupted (zlib)", ("label-solve", "--dataset", "mnist", "--data-dir",
                                                           f"{D}/data", "--out", f"{D}/ls"), "not a readable .npz",
         _bad_dataset_dir),
    Case("label-solve", "--ls-reg nan", ("label-solve", "--dataset", "digits", "--ls-reg", "nan"), "finite number"),
    Case("label-solve", "--reg -inf", ("label-solve", "--dataset", "digits", "--reg=-inf"), "finite number"),
    Case("label-solve", "--memory-budget-mb 0", ("label-solve", "--dataset", "digits", "--memory-budget-mb", "0"),
         "must be > 0"),
    Case("label-solve", "--out under a file (checked before the solve)",
         ("label-solve", "--dataset", "digits", "--out", f"{D}/F/ls"), "is a file"),
    Case("label-solve", "--out under /proc", ("label-solve", "--dataset", "digits", "--out", "/proc/kd-test"),
         "/proc/kd-test"),
    Case("label-solve", "--support-size not a multiple of the classes",
         ("label-solve", "--dataset", "digits", "--support-size", "15", "--out", f"{D}/ls"), "multiple of 10"),
    # -- report
    Case("report", "run folder does not exist", ("report", f"{D}/nothing", "--out", f"{D}/rep"), "no such folder"),
    Case("report", "a file instead of a run folder", ("report", f"{D}/F", "--out", f"{D}/rep"), "no such folder"),
    Case("report", "a folder without results.json", ("report", f"{D}/data", "--out", f"{D}/rep"),
         "holds no results.json", _bad_dataset_dir),
    Case("report", "results.json not JSON", ("report", f"{D}/run", "--out", f"{D}/rep"), "not valid JSON",
         lambda d: (d / "run" / "results.json").write_text("{oops")),
    Case("report", "results.json a list", ("report", f"{D}/run", "--out", f"{D}/rep"), "not a JSON object",
         lambda d: (d / "run" / "results.json").write_text("[1, 2]")),
    Case("report", "--out under a file", ("report", f"{D}/run", "--out", f"{D}/F/rep"),
         "a parent of it is a file"),
    # -- demo
    Case("demo", "--out holds a finished run", ("demo", "--out", f"{D}/run"), "is not empty"),
    Case("demo", "--out is a file", ("demo", "--out", f"{D}/F"), "is a file"),
    # -- kip: run folders
    Case("kip", "--out holds a finished run", ("kip", "--out", f"{D}/run", *RUN_ARGS), "is not empty"),
    Case("kip", "--out holds a killed run (no checkpoint)", ("kip", "--out", f"{D}/run", *RUN_ARGS), "is not empty",
         _no_checkpoint),
    Case("kip", "--out is a file", ("kip", "--out", f"{D}/F", *RUN_ARGS), "is a file"),
    Case("kip", "--out under a file", ("kip", "--out", f"{D}/F/run", *RUN_ARGS), "is a file"),
    Case("kip", "--out under /proc", ("kip", "--out", "/proc/kd-test", *RUN_ARGS), "/proc/kd-test"),
    Case("kip", "--resume with --out", ("kip", "--resume", f"{D}/run", "--steps", "9", "--out", f"{D}/other"),
         "--out cannot be used with --resume"),
    Case("kip", "--resume with --overwrite", ("kip", "--resume", f"{D}/run", "--steps", "9", "--overwrite"),
         "--overwrite cannot be used"),
    Case("kip", "--init-from a set of another size", ("kip", "--out", f"{D}/warm", "--init-from", SET, "--per-class", "3",
                                                     "--steps", "6", "--no-progress"), "not 3 per class"),
    Case("kip", "--init-from a set preprocessed otherwise", ("kip", "--out", f"{D}/warm", "--init-from", SET, "--zca",
                                                           *RUN_ARGS), "preprocessed differently"),
    Case("kip", "--init-from a missing file", ("kip", "--out", f"{D}/warm", "--init-from", f"{D}/missing.npz",
                                               *RUN_ARGS), "no such file"),
    Case("kip", "--init-from with --init", ("kip", "--out", f"{D}/warm", "--init-from", SET, "--init", "noise",
                                            *RUN_ARGS), "--init and --init-from"),
    Case("kip", "--resume a missing folder", ("kip", "--resume", f"{D}/nothing", "--steps", "9"), "not a folder"),
    Case("kip", "--resume a folder without checkpoint", ("kip", "--resume", f"{D}/run", "--steps", "9"),
         "no checkpoint.npz", _no_checkpoint),
    Case("kip", "--resume a corrupted checkpoint", ("kip", "--resume", f"{D}/run", "--steps", "9"),
         "unreadable checkpoint.npz", _corrupt_checkpoint),
    Case("kip", "--resume: config.json not JSON", ("kip", "--resume", f"{D}/run", "--steps", "9"), "config.json",
         _config("{oops")),
    Case("kip", "--resume: config.json a list", ("kip", "--resume", f"{D}/run", "--steps", "9"), "JSON object",
         _config("[1, 2]")),
    Case("kip", "--resume: config.json per_class a string", ("kip", "--resume", f"{D}/run", "--steps", "9"),
         "--per-class", _config_edit(per_class="ten")),
    Case("kip", "--resume: config.json from another run (per_class 3) beside the checkpoint",
         ("kip", "--resume", f"{D}/run", "--steps", "9"), "mixes two runs", _config_edit(per_class=3)),
    Case("kip", "--resume: config.json unknown field", ("kip", "--resume", f"{D}/run", "--steps", "9"),
         "unknown KIP config field", _config_edit(colour="red")),
    Case("kip", "--resume a folder in use by a live run", ("kip", "--resume", f"{D}/run", "--steps", "9"),
         "pid 4242", patch=_held_lock),
    Case("kip", "--resume --steps below the checkpoint", ("kip", "--resume", f"{D}/run", "--steps", "3"),
         "at step 6"),
    Case("kip", "--resume --steps equal to the checkpoint", ("kip", "--resume", f"{D}/run", "--steps", "6"),
         "at step 6"),
    *[Case("kip", f"--resume {flag} {value} (changes the result)",
           ("kip", "--resume", f"{D}/run", "--steps", "9", flag, *([value] if value else [])), f"{flag} would change")
      for flag, value in [("--get", "nngp"), ("--depth", "3"), ("--W-std", "1.0"), ("--b-std", "0.2"),
                          ("--reg", "1e-3"), ("--lr", "0.2"), ("--target-batch", "50"), ("--test-limit", "10"),
                          ("--per-class", "3"), ("--seed", "1"), ("--zca", ""), ("--zca-reg", "0.2"),
                          ("--learn-labels", ""), ("--init", "noise"), ("--kernel", "convnet"),
                          ("--select-on", "test"), ("--val-size", "50")]],
    Case("kip", "--resume --dataset mnist", ("kip", "--resume", f"{D}/run", "--steps", "9", "--dataset", "mnist"),
         "--dataset would change"),
    Case("kip", "--lr nan", ("kip", "--out", f"{D}/new", "--lr", "nan"), "finite number"),
    Case("kip", "--lr 1e300 (inf in float32)", ("kip", "--out", f"{D}/new", "--lr", "1e300"), "float32 range"),
    Case("kip", "--reg inf", ("kip", "--out", f"{D}/new", "--reg", "inf"), "finite number"),
    Case("kip", "--zca-reg nan", ("kip", "--out", f"{D}/new", "--zca-reg", "nan"), "finite number"),
    Case("kip", "--memory-budget-mb nan", ("kip", "--out", f"{D}/new", "--memory-budget-mb", "nan"),
         "finite number"),
    Case("kip", "--b-std -1", ("kip", "--out", f"{D}/new", "--b-std", "-1"), "must be >= 0"),
    Case("kip", "--steps 0", ("kip", "--out", f"{D}/new", "--steps", "0"), "positive integer"),
    Case("kip", "--lr 1e30 diverges (the message names the step and the step-0 checkpoint)",
         ("kip", "--out", f"{D}/new", "--lr", "1e30", *RUN_ARGS), "keeps the last good checkpoint (step 0)",
         may_add=True),
    Case("kip", "disk full during the run (checkpoint at step 9 kept)",
         ("kip", "--resume", f"{D}/run", "--steps", "12", "--no-progress"), "No space left on device",
         patch=_disk_full_after, may_add=True, check=_checkpoint_at(9)),

    # -- every writing command: an existing run folder is never replaced nor mixed (issue 28, items 1-4)
    *[Case(command, f"--out holds a finished KIP run{via}", (*argv, "--out", f"{D}/{folder}"), "is not empty",
           setup)
      for command, argv in [("label-solve", ("label-solve", "--dataset", "digits")), ("evaluate", ("evaluate", SET)),
                            ("baseline", ("baseline", "--dataset", "digits", "--seeds", "1")),
                            ("transfer", ("transfer", SET, "--steps", "2", "--seeds", "1"))]
      for via, folder, setup in [("", "run", None), (" (through a symlink)", "link", _symlink("link", "run"))]],
    *[Case(command, f"--out holds a finished KIP run, with --overwrite{via}", (*argv, "--out", f"{D}/{folder}",
                                                                              "--overwrite"), "holds a kip run",
           setup)
      for command, argv in [("label-solve", ("label-solve", "--dataset", "digits")), ("evaluate", ("evaluate", SET)),
                            ("baseline", ("baseline", "--dataset", "digits", "--seeds", "1")),
                            ("transfer", ("transfer", SET, "--steps", "2", "--seeds", "1"))]
      for via, folder, setup in [("", "run", None), (" (through a symlink)", "link", _symlink("link", "run"))]],
    Case("baseline", "--overwrite of an evaluate run's folder", ("baseline", "--dataset", "digits", "--out", f"{D}/ev",
                                                                 "--overwrite"), "holds an evaluate run",
         _previous_evaluate),
    Case("kip", "--overwrite of an evaluate run's folder", ("kip", "--out", f"{D}/ev", "--overwrite", *RUN_ARGS),
         "holds an evaluate run", _previous_evaluate),
    Case("demo", "--overwrite of an evaluate run's folder", ("demo", "--out", f"{D}/ev", "--overwrite"),
         "holds an evaluate run", _previous_evaluate),
    Case("evaluate", "--out is a dangling symlink", ("evaluate", SET, "--out", f"{D}/dangling"), "does not exist",
         _symlink("dangling", "nowhere")),
    Case("kip", "--out is a dangling symlink", ("kip", "--out", f"{D}/dangling", *RUN_ARGS), "does not exist",
         _symlink("dangling", "nowhere")),
    *[Case(command, '--out ""', (*argv, "--out", ""), "--out is empty")
      for command, argv in [("evaluate", ("evaluate", SET)), ("baseline", ("baseline", "--dataset", "digits")),
                            ("label-solve", ("label-solve", "--dataset", "digits")),
                            ("transfer", ("transfer", SET, "--steps", "2")), ("kip", ("kip", *RUN_ARGS)),
                            ("demo", ("demo",)), ("report", ("report", f"{D}/run"))]],
    Case("kip", '--resume ""', ("kip", "--resume", ""), "--resume is empty"),
    Case("report", "--out into a finished KIP run", ("report", f"{D}/run", "--out", f"{D}/run"), "is not empty"),
    Case("report", "--out into a finished KIP run, with --overwrite", ("report", f"{D}/run", "--out", f"{D}/run",
                                                                       "--overwrite"), "holds a kip run"),
    Case("report", "--out onto an earlier report", ("report", f"{D}/run", "--out", f"{D}/rep"), "is not empty",
         _previous_report),
    Case("zoo", "export onto an existing .npz", ("zoo", "export", "mnist-kip-fc-1ipc", SET), "exists"),
    Case("zoo", "export onto a run's distilled.npz", ("zoo", "export", "mnist-kip-fc-1ipc", f"{D}/run/distilled.npz"),
         "exists"),
    Case("zoo", "export onto a run's distilled.npz, with --overwrite",
         ("zoo", "export", "mnist-kip-fc-1ipc", f"{D}/run/distilled.npz", "--overwrite"), "belongs to the kip run"),
    Case("zoo", "export into a folder a live kip holds", ("zoo", "export", "mnist-kip-fc-1ipc", f"{D}/run/new.npz"),
         "pid 4242", patch=_held_lock),
    Case("zoo", 'export to ""', ("zoo", "export", "mnist-kip-fc-1ipc", ""), "PATH is empty"),
    Case("zoo", "export to a dangling symlink", ("zoo", "export", "mnist-kip-fc-1ipc", f"{D}/dangling.npz"),
         "does not exist", _symlink("dangling.npz", "nowhere.npz")),
    Case("zoo", "report --out into a finished KIP run", ("zoo", "report", "--out", f"{D}/run", "--overwrite"),
         "holds a kip run"),
    # -- export: to PyTorch / Hugging Face formats (issue 29), under the same folder rules
    Case("export", "SET does not exist", ("export", f"{D}/missing.npz", f"{D}/out.safetensors", "--format",
                                          "safetensors"), "no such file"),
    Case("export", "OUT is an existing file", ("export", SET, f"{D}/F", "--format", "safetensors"),
         "ending in .safetensors"),
    Case("export", "safetensors onto an existing file", ("export", SET, f"{D}/old.safetensors", "--format",
                                                         "safetensors"), "exists",
         _write_bytes("old.safetensors", b"an earlier file")),
    Case("export", "imagefolder into a finished KIP run", ("export", SET, f"{D}/run", "--format", "imagefolder"),
         "is not empty"),
    Case("export", "parquet into a finished KIP run, with --overwrite",
         ("export", SET, f"{D}/run", "--format", "parquet", "--overwrite"), "holds a kip run"),
    Case("export", "a run folder that wrote no distilled set", ("export", f"{D}/ev", f"{D}/out.safetensors",
                                                                "--format", "safetensors"), "wrote no distilled set",
         _previous_evaluate),
    Case("export", "a released KIP file (no preprocessing) as PNGs",
         ("export", f"{D}/released.npz", f"{D}/png", "--format", "imagefolder"), "carries no preprocessing",
         _with("released.npz", metadata=None, preprocess_mean=None, preprocess_std=None)),
    Case("export", "--format unknown", ("export", SET, f"{D}/o", "--format", "onnx"), "invalid choice"),
    Case("export", 'OUT ""', ("export", SET, "", "--format", "parquet"), "OUT is empty"),
    # -- Ray: an address where nothing listens fails at once (it used to retry until killed; item 8)
    *[Case(command, "--ray-address 127.0.0.1:1 (nothing listening)",
           (*argv, "--backend", "ray", "--ray-address", "127.0.0.1:1"), "nothing answers there")
      for command, argv in [("evaluate", ("evaluate", SET)), ("baseline", ("baseline", "--dataset", "digits")),
                            ("label-solve", ("label-solve", "--dataset", "digits", "--out", f"{D}/ls")),
                            ("kip", ("kip", "--out", f"{D}/new", *RUN_ARGS))]],
    # -- report: a results.json that breaks the schema is refused before anything is written (item 6)
    Case("report", "results.json: a string where a number belongs", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "must be a number", _results_edit(_metrics(test_accuracy="97%"))),
    Case("report", "bad results.json with --overwrite of an earlier report: the earlier one stays whole",
         ("report", f"{D}/run", "--out", f"{D}/rep", "--overwrite"), "must be a number",
         lambda d: (_previous_report(d), _results_edit(_metrics(test_accuracy="97%"))(d))),
    Case("report", 'results.json: "support_size": "100"', ("report", f"{D}/run", "--out", f"{D}/rep"),
         "support_size must be", _results_edit(_metrics(support_size="100"))),
    Case("report", "results.json: metrics a list", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "'metrics' must be a JSON object", _results_edit(lambda r: dict(r, metrics=[0.9]))),
    Case("report", "results.json: a curve of strings", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "curve loss", _results_edit(lambda r: dict(r, curves=dict(loss=[["a", "b"]])))),
    Case("report", "results.json: command a number", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "'command' must be", _results_edit(lambda r: dict(r, command=7))),
    Case("report", "results.json: accuracy 97 (a percentage)", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "not a fraction", _results_edit(_metrics(test_accuracy=97.0))),
    Case("report", "results.json: dataset.num_test a float", ("report", f"{D}/run", "--out", f"{D}/rep"),
         "num_test must be a whole number",
         _results_edit(lambda r: dict(r, dataset=dict(r["dataset"], num_test=12.5)))),
    # -- absurd sizes in a file's metadata fail before anything is allocated (item 7)
    Case("evaluate", "metadata kernel depth 10^9", ("evaluate", f"{D}/deep.npz"), "beyond the 100 layers",
         _with_metadata("deep.npz", _meta(kernel={"architecture": "fc", "depth": 10**9}))),
    Case("evaluate", "metadata random features width 10^9", ("evaluate", f"{D}/wide.npz"), "width 1000000000",
         _with_metadata("wide.npz", _meta(kernel={"architecture": "convnet3", "depth": 3,
                                                  "random_features": {"width": 10**9}}))),
    Case("label-solve", "--support whose metadata asks for depth 10^9",
         ("label-solve", "--dataset", "digits", "--support", f"{D}/deep.npz", "--out", f"{D}/ls"),
         "beyond the 100 layers", _with_metadata("deep.npz", _meta(kernel={"architecture": "fc", "depth": 10**9}))),
    Case("kip", "--depth 1000000000", ("kip", "--out", f"{D}/new", "--depth", "1000000000", *RUN_ARGS),
         "beyond the 100 layers"),
    Case("evaluate", "--rf-models 10^6", ("evaluate", SET, "--kernel", "convnet3-rf", "--rf-models", "1000000"),
         "models 1000000"),
    # -- messages name the options, not internal fields (item 10)
    Case("kip", "--per-class 0", ("kip", "--out", f"{D}/new", "--per-class", "0"), "--per-class must be"),
    Case("kip", "--eval-every 0", ("kip", "--out", f"{D}/new", "--eval-every", "0"), "--eval-every must be"),
    Case("kip", "--checkpoint-every -1", ("kip", "--out", f"{D}/new", "--checkpoint-every", "-1"),
         "--checkpoint-every must be"),
    Case("kip", "--target-batch 0", ("kip", "--out", f"{D}/new", "--target-batch", "0"), "--target-batch must be"),
    Case("transfer", "--batch-size 0", ("transfer", SET, "--batch-size", "0"), "--batch-size must be"),
    Case("transfer", "--eval-every 0", ("transfer", SET, "--eval-every", "0"), "--eval-every must be"),
    Case("evaluate", "--memory-budget-mb 1e-9", ("evaluate", SET, "--memory-budget-mb", "1e-9"),
         "--memory-budget-mb must be at least 1"),
    Case("kip", "--memory-budget-mb 0.5", ("kip", "--out", f"{D}/new", "--memory-budget-mb", "0.5"),
         "--memory-budget-mb must be at least 1"),
    Case("kip", "--init-from a set made on mnist: the advice names --dataset",
         ("kip", "--out", f"{D}/warm", "--init-from", f"{D}/mnist.npz", *RUN_ARGS), "use --dataset mnist",
         _with_metadata("mnist.npz", _meta(dataset="mnist"))),
    Case("datasets", "--data-dir that does not exist", ("datasets", "--data-dir", f"{D}/no-such-folder"),
         "does not exist"),
    Case("datasets", "--data-dir is a file", ("datasets", "--data-dir", f"{D}/F"), "is not a folder"),
    Case("baseline", "a folder where test.npz belongs", ("baseline", "--dataset", "mnist", "--data-dir", f"{D}/data"),
         "is a folder, not an .npz file", _test_split_is_a_folder),
    Case("label-solve", "--train-limit below the support size",
         ("label-solve", "--dataset", "digits", "--train-limit", "5", "--support-size", "20", "--out", f"{D}/ls"),
         "underdetermined"),
    # -- options a file's own preprocessing would silently override (audit)
    Case("evaluate", "--zca-reg with a file that carries its preprocessing", ("evaluate", SET, "--zca-reg", "5"),
         "drop --zca-reg"),
    Case("transfer", "--zca-reg with a file that carries its preprocessing",
         ("transfer", SET, "--zca-reg", "5", "--steps", "2"), "drop --zca-reg"),
    Case("label-solve", "--zca-reg with a --support that carries its preprocessing",
         ("label-solve", "--dataset", "digits", "--support", SET, "--zca-reg", "5", "--out", f"{D}/ls"),
         "drop --zca-reg"),
    Case("label-solve", "--seed with --support", ("label-solve", "--dataset", "digits", "--support", SET, "--seed",
                                                  "3", "--out", f"{D}/ls"), "drop --seed"),
]


# ----------------------------------------------------------------------------------------------------
# Running a case.


def make_finished_run(folder: pathlib.Path) -> pathlib.Path:
    """A finished 6-step KIP run on digits in ``folder/run`` and its last support as ``folder/set.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["kip", "--out", str(folder / "run"), *RUN_ARGS])
    assert code == 0, "the finished run the cases start from failed"
    shutil.copy(folder / "run" / "distilled.npz", folder / "set.npz")
    (folder / "F").write_text("a plain file\n")
    return folder


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@dataclasses.dataclass
class Outcome:
    case: Case
    exit_code: int | None
    stderr: str
    traceback: str | None
    files_unchanged: bool
    new_files: list[str]
    check_passed: bool = True

    @property
    def one_line(self) -> bool:
        return self.stderr.count("\n") == 1 and self.stderr.startswith("kernel-distill: error:")

    @property
    def ok(self) -> bool:
        return (self.exit_code == 2 and self.one_line and self.traceback is None and self.files_unchanged
                and (self.case.may_add or not self.new_files) and self.check_passed and self.case.match in self.stderr)


def run_case(case: Case, template: pathlib.Path, folder: pathlib.Path) -> Outcome:
    """Copy ``template`` (from :func:`make_finished_run`) to ``folder``, set the case up, run it, judge it."""
    shutil.copytree(template, folder)
    if case.setup:
        case.setup(folder)
    before = _snapshot(folder)
    argv = [a.replace("{d}", str(folder)) for a in case.argv]
    if "--no-progress" not in argv and case.command not in ("report", "zoo", "datasets"):  # these show none
        argv.append("--no-progress")
    err, code, trace = io.StringIO(), None, None
    patch = case.patch(folder) if case.patch else contextlib.nullcontext()
    with patch, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:  # what a user would see as a traceback
            trace = traceback.format_exc()
    after = _snapshot(folder)
    if case.check is not None:
        unchanged, check_passed = True, bool(case.check(folder))
    else:
        unchanged, check_passed = all(after.get(name) == data for name, data in before.items()), True
    return Outcome(case, code, err.getvalue(), trace, unchanged, sorted(set(after) - set(before)), check_passed)


# ----------------------------------------------------------------------------------------------------
# Runs killed with SIGKILL, and two runs started at once on one folder (subprocesses).

# 60 steps with a checkpoint every 5: long enough to be killed in the middle, a few seconds in all.
LONG_ARGS = ["--per-class", "2", "--steps", "60", "--eval-every", "20", "--checkpoint-every", "5", "--target-batch",
             "300", "--learn-labels", "--no-progress"]
SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def make_reference_run(folder: pathlib.Path) -> pathlib.Path:
    """The uninterrupted run that every interrupted one must reproduce bit for bit."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["kip", "--out", str(folder), *LONG_ARGS]) == 0
    return folder


def spawn_kip(*argv) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "kernel_distill.cli", "kip", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics_without_times(folder: pathlib.Path) -> list[dict]:
    records = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time", None)
        records.append(record)
    return records


def _last_logged_step(folder: pathlib.Path) -> int:
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)
    except (OSError, ValueError):
        return -1


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the run neither reached the kill point nor ended")


def differences(folder: pathlib.Path, reference: pathlib.Path) -> list[str]:
    """What differs between two run folders' results (empty: the same run, bit for bit)."""
    from kernel_distill.io import load_distilled
    from kernel_distill.kip import load_checkpoint

    found = []
    got, want = load_distilled(folder / "distilled.npz"), load_distilled(reference / "distilled.npz")
    if not np.array_equal(got.images, want.images) or not np.array_equal(got.labels, want.labels):
        found.append("distilled.npz")
    (_, got_state), (_, want_state) = load_checkpoint(folder), load_checkpoint(reference)
    if got_state.step != want_state.step or not all(
            np.array_equal(a, b) for a, b in zip(got_state.opt_leaves + [got_state.key],
                                                 want_state.opt_leaves + [want_state.key])):
        found.append("checkpoint.npz")
    if metrics_without_times(folder) != metrics_without_times(reference):
        found.append("metrics.jsonl")  # a lost, doubled or interleaved record
    return found


def kill_and_resume(folder: pathlib.Path, reference: pathlib.Path) -> dict:
    """Start a run, SIGKILL it after its step-0 checkpoint, resume and SIGKILL it at steps 17 and 43 (between
    checkpoints), leave a half-written temporary file, resume to the end; compare with ``reference``."""
    from kernel_distill.kip import load_checkpoint

    killed = []
    proc = spawn_kip("--out", folder, *LONG_ARGS)
    killed.append(_kill_when(proc, lambda: (folder / "checkpoint.npz").exists()))
    for step in (17, 43):
        proc = spawn_kip("--resume", folder, "--no-progress")
        killed.append(_kill_when(proc, lambda: _last_logged_step(folder) >= step))
    (folder / ".checkpoint.npz.deadbeef.tmp").write_bytes(b"half a checkpoint")
    if load_checkpoint(folder)[1].step < 60:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["kip", "--resume", str(folder), "--no-progress"]) == 0
    return dict(killed=killed, stale_temp_left=[p.name for p in folder.glob(".*.tmp")],
                differences=differences(folder, reference))


def kill_during_final_writes(folder: pathlib.Path, reference: pathlib.Path) -> dict:
    """Start a run and SIGKILL it during its final writes (its last checkpoint is on disk, ``distilled.npz``
    is, ``results.json`` is not yet); then ``--resume`` with no options must finish the outputs without a new
    step, and the folder must equal ``reference``."""
    from kernel_distill.kip import load_checkpoint
    from kernel_distill.runs import read_history

    proc = spawn_kip("--out", folder, *LONG_ARGS)
    killed = _kill_when(proc, lambda: (folder / "distilled.npz").exists() and not (folder / "results.json").exists())
    outputs_before = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    step_before = load_checkpoint(folder)[1].step
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["kip", "--resume", str(folder), "--no-progress"])
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    history = read_history(folder)
    return dict(killed=killed, outputs_before=outputs_before, step_before=step_before, exit_code=code,
                stderr=err.getvalue(), results_steps=results.get("metrics", {}).get("steps"),
                resumed_at=history[-1]["step"] if history else None,
                differences=differences(folder, reference))


def two_runs_at_once(folder: pathlib.Path, reference: pathlib.Path) -> dict:
    """Start two identical runs on one folder at the same moment; one must run, the other be refused."""
    procs = [spawn_kip("--out", folder, *LONG_ARGS) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    refused = [err for code, err in results if code == 2]
    return dict(codes=sorted(code for code, _ in results), refusal=refused[0].strip() if refused else None,
                differences=differences(folder, reference) if (folder / "distilled.npz").exists() else ["missing"])
