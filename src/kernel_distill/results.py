"""One results schema for every command and benchmark (documented in ``docs/FORMAT.md``).

A *result record* is a JSON object::

    {"schema": "kernel-distill/result", "schema_version": 1,
     "command": "kip",                 # kip, label-solve, evaluate, baseline, transfer, or benchmark/<name>
     "method": "kip",                  # kip, label_solve, natural, file, kernel_throughput, ...
     "dataset": {"name": "mnist", "checksums": {"train": "sha256:...", "test": "sha256:..."},
                 "num_train": 55000, "num_val": 5000, "num_test": 10000},
     "selection": {"split": "validation", "val_size": 5000, "step": 900},
     "metrics": {"test_accuracy": 0.97, ...},   # accuracies are fractions in [0, 1]
     "config": {...},                  # everything needed to rerun it
     "curves": {"validation_accuracy": [[step, value], ...], ...},
     "artifacts": {"distilled": "distilled.npz", ...},   # paths relative to the run folder
     "provenance": {"package_version": "0.1.0", "git_commit": "...", "git_dirty": false, "python": "3.11.2",
                    "jax_version": "0.10.2", "jaxlib_version": "0.10.2", "backend": "cpu",
                    "device": "cpu", "dtype": "float32", "command_line": "kernel-distill kip ...",
                    "wall_seconds": 12.3, "date": "2026-11-25T23:59:00Z", "machine": "x86_64, 2 CPUs"}}

Commands write it as ``RUN_DIR/results.json``; benchmarks append one record per line to
``benchmarks/results/<script>.jsonl``. :func:`validate_record` checks a record against this schema.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys

import numpy as np

from kernel_distill.atomic import atomic_write_text
from kernel_distill.checksums import split_checksum  # noqa: F401 (re-exported: its old home)
from kernel_distill.errors import KernelDistillError

SCHEMA = "kernel-distill/result"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"

REQUIRED = ("schema", "schema_version", "command", "method", "dataset", "selection", "metrics", "config",
            "provenance")
PROVENANCE_KEYS = ("package_version", "git_commit", "git_dirty", "python", "jax_version", "jaxlib_version",
                   "backend", "device", "dtype", "command_line", "wall_seconds", "date", "machine")
SELECTION_SPLITS = ("validation", "test", "none")


def dataset_record(name: str | None, checksums: dict | None = None, **counts: int | None) -> dict:
    """The ``dataset`` entry: name, per-split checksums (:func:`split_checksum`) and image counts."""
    return dict(name=name, checksums=dict(checksums or {}), **{k: int(v) for k, v in counts.items() if v is not None})


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """The commit (and whether the tree is dirty) of the checkout this package runs from, if any."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def capture_code_version() -> None:
    """Read the checkout's commit now (it is cached): a command calls this when it starts, so that a record
    written hours later names the code that ran, not a commit made meanwhile."""
    _git_state()


def provenance(dtype: str = "float32", wall_seconds: float | None = None, argv: list[str] | None = None) -> dict:
    """Where a number came from: versions, commit, device, dtype, command line, wall time and date (UTC)."""
    import jax
    import jaxlib

    from kernel_distill import __version__

    commit, dirty = _git_state()
    device = jax.devices()[0]
    argv = sys.argv if argv is None else argv
    program = "kernel-distill" if argv and argv[0].endswith(("kernel-distill", "cli.py")) else (argv[0] if argv else "")
    return dict(package_version=__version__, git_commit=commit, git_dirty=dirty, python=platform.python_version(),
                jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, backend=jax.default_backend(),
                device=str(getattr(device, "device_kind", device.platform)), dtype=str(np.dtype(dtype)),
                command_line=shlex.join([os.path.basename(program), *argv[1:]]) if argv else "",
                wall_seconds=None if wall_seconds is None else float(wall_seconds),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs")


def make_record(command: str, method: str, dataset: dict, metrics: dict, config: dict, *,
                selection: dict | None = None, curves: dict | None = None, artifacts: dict | None = None,
                dtype: str = "float32", wall_seconds: float | None = None, argv: list[str] | None = None,
                provenance_overrides: dict | None = None) -> dict:
    """Assemble and validate a result record (see the module docstring)."""
    record = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, command=command, method=method, dataset=dataset,
                  selection=selection or dict(split="none"), metrics=_plain(metrics), config=_plain(config),
                  curves=_plain(curves or {}), artifacts=dict(artifacts or {}),
                  provenance=dict(provenance(dtype, wall_seconds, argv), **(provenance_overrides or {})))
    validate_record(record)
    return record


def _plain(value):
    """numpy scalars and arrays, tuples -> JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_record(record: dict, source: str = "result record") -> dict:
    """Raise :class:`KernelDistillError` if ``record`` does not follow the schema; return it otherwise."""
    if not isinstance(record, dict):
        raise KernelDistillError(f"{source}: not a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise KernelDistillError(f"{source}: missing {', '.join(missing)}")
    if record["schema"] != SCHEMA or record["schema_version"] != SCHEMA_VERSION:
        raise KernelDistillError(f"{source}: schema {record['schema']!r} version {record['schema_version']!r}, "
                                 f"expected {SCHEMA!r} version {SCHEMA_VERSION}")
    for key in ("command", "method"):
        if not isinstance(record[key], str) or not record[key]:
            raise KernelDistillError(f"{source}: '{key}' must be a non-empty string, got {record[key]!r}")
    for key in ("dataset", "selection", "metrics", "config", "provenance", "curves", "artifacts"):
        if key in record and not isinstance(record[key], dict):
            raise KernelDistillError(f"{source}: '{key}' must be a JSON object, got {type(record[key]).__name__}")
    if "name" not in record["dataset"] or not isinstance(record["dataset"]["name"], (str, type(None))):
        raise KernelDistillError(f"{source}: 'dataset' must be an object with a 'name' string")
    for key, value in record["dataset"].items():
        if key.startswith("num_") and not _is_count(value):
            raise KernelDistillError(f"{source}: dataset.{key} must be a whole number, got {value!r}")
    if record["selection"].get("split") not in SELECTION_SPLITS:
        raise KernelDistillError(f"{source}: selection split must be one of {SELECTION_SPLITS}")
    missing = [k for k in PROVENANCE_KEYS if k not in record["provenance"]]
    if missing:
        raise KernelDistillError(f"{source}: provenance lacks {', '.join(missing)}")
    for key, value in record["metrics"].items():
        numbers = value if isinstance(value, list) else [value]
        if not all(v is None or _is_number(v) for v in numbers):
            raise KernelDistillError(f"{source}: metric {key} must be a number (or a list of numbers), got {value!r}")
        if "accuracy" in key and any(v is not None and not (0.0 <= v <= 1.0) for v in numbers):
            raise KernelDistillError(f"{source}: metric {key} = {value} is not a fraction in [0, 1]")
        if (key in ("support_size", "steps", "best_step") or key.startswith("num_")) and not _is_count(value):
            raise KernelDistillError(f"{source}: metric {key} must be a whole number, got {value!r}")
    for key, curve in record.get("curves", {}).items():
        if not isinstance(curve, list) or not all(_is_point(p) for p in curve):
            if not (isinstance(curve, list) and all(isinstance(row, list) and all(_is_number(v) for v in row)
                                                    for row in curve)):
                raise KernelDistillError(f"{source}: curve {key} must be a list of [step, value] pairs (or a "
                                         f"matrix of numbers)")
    for key, value in record.get("artifacts", {}).items():
        if not isinstance(value, str):
            raise KernelDistillError(f"{source}: artifact {key} must be a file name, got {value!r}")
    wall = record["provenance"].get("wall_seconds")
    if wall is not None and not _is_number(wall):
        raise KernelDistillError(f"{source}: provenance.wall_seconds must be a number, got {wall!r}")
    json.dumps(record)  # must be JSON-serialisable
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _is_count(value) -> bool:
    return value is None or (_is_number(value) and float(value).is_integer() and value >= 0)


def _is_point(point) -> bool:
    return isinstance(point, list) and len(point) == 2 and all(_is_number(v) for v in point)


def write_results(run_dir: str | os.PathLike, record: dict) -> pathlib.Path:
    """Write ``run_dir/results.json`` atomically."""
    return atomic_write_text(pathlib.Path(run_dir) / RESULTS_FILE, json.dumps(record, indent=2) + "\n")


def read_results(path: str | os.PathLike) -> dict:
    """Read and validate a ``results.json`` (or a run folder holding one)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise KernelDistillError(f"{path}: no such file (not a kernel-distill run folder?)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KernelDistillError(f"{path}: not valid JSON ({e})") from None
    return validate_record(record, str(path))


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line (benchmarks' ``benchmarks/results/<script>.jsonl``)."""
    validate_record(record)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``.jsonl`` file, validated."""
    path = pathlib.Path(path)
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(validate_record(json.loads(line), f"{path}:{i}"))
            except json.JSONDecodeError as e:
                raise KernelDistillError(f"{path}:{i}: not valid JSON ({e})") from None
    return records
