"""KIP checkpoints: the complete state of a run, written atomically, read back with clear errors.

A checkpoint (``checkpoint.npz`` beside ``config.json``) holds the support, the labels, the optimiser state's
leaves, the random key, the step and the best support, so a resumed run is step-for-step identical to an
uninterrupted one. Its format is unchanged since the first release (a missing later field reads as its
default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Callable

import numpy as np

from kernel_distill import runs
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import atomic_savez
from kernel_distill.kip.config import RESUMABLE_FIELDS, KipConfig, config_flag
from kernel_distill.kip.state import KipState

CHECKPOINT = "checkpoint.npz"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


def save_checkpoint(out_dir: pathlib.Path, state: KipState) -> None:
    arrays = dict(step=np.int64(state.step), images=state.images, labels=state.labels, key=state.key,
                  best_images=state.best_images, best_labels=state.best_labels,
                  best_accuracy=np.float64(state.best_accuracy), best_step=np.int64(state.best_step),
                  last_accuracy=np.float64(np.nan if state.last_accuracy is None else state.last_accuracy),
                  best_test_accuracy=np.float64(np.nan if state.best_test_accuracy is None
                                                else state.best_test_accuracy),
                  last_val_accuracy=np.float64(np.nan if state.last_val_accuracy is None else state.last_val_accuracy),
                  log_scale=np.float64(state.log_scale), num_opt_leaves=np.int64(len(state.opt_leaves)))
    for i, leaf in enumerate(state.opt_leaves):
        arrays[f"opt_{i}"] = np.asarray(leaf)
    atomic_savez(out_dir / CHECKPOINT, **arrays)


def load_checkpoint(out_dir: pathlib.Path) -> tuple[KipConfig, KipState]:
    """Read ``config.json`` and ``checkpoint.npz`` from a run folder, with a clear error if unusable."""
    out_dir = pathlib.Path(out_dir)
    config_path, checkpoint_path = out_dir / CONFIG, out_dir / CHECKPOINT
    if not out_dir.is_dir():
        raise KernelDistillError(f"cannot resume: {out_dir} is not a folder")
    if not config_path.is_file():
        raise KernelDistillError(f"cannot resume: {out_dir} has no {CONFIG} (not a KIP run folder)")
    if not checkpoint_path.is_file():
        raise KernelDistillError(f"cannot resume: {out_dir} has no {CHECKPOINT} (the run stopped before its first "
                                 f"checkpoint); start it again with --out {out_dir} --overwrite")
    try:
        config = KipConfig.from_dict(json.loads(config_path.read_text()))
    except KernelDistillError as e:
        raise KernelDistillError(f"cannot resume from {out_dir}: {CONFIG}: {e}") from None
    except (ValueError, OSError) as e:  # bad JSON or UTF-8, unreadable file
        raise KernelDistillError(f"cannot resume from {out_dir}: {CONFIG} is unreadable ({e})") from None
    try:
        with np.load(checkpoint_path, allow_pickle=False) as f:
            leaves = [f[f"opt_{i}"] for i in range(int(f["num_opt_leaves"]))]
            def optional(name):
                value = float(f[name]) if name in f.files else math.nan
                return None if math.isnan(value) else value

            state = KipState(step=int(f["step"]), images=f["images"], labels=f["labels"], opt_leaves=leaves,
                             key=f["key"], best_images=f["best_images"], best_labels=f["best_labels"],
                             best_accuracy=float(f["best_accuracy"]), best_step=int(f["best_step"]),
                             last_accuracy=optional("last_accuracy"),
                             best_test_accuracy=optional("best_test_accuracy"),
                             last_val_accuracy=optional("last_val_accuracy"),
                             log_scale=float(f["log_scale"]) if "log_scale" in f.files else 0.0)
            if state.best_test_accuracy is None and config.select_on == "test":  # an older checkpoint
                state = dataclasses.replace(
                    state, best_test_accuracy=state.best_accuracy if state.best_step >= 0 else None)
    except Exception as e:  # a truncated zip, bad zlib data, a missing key: all mean the checkpoint is unusable
        raise KernelDistillError(f"cannot resume from {out_dir}: unreadable {CHECKPOINT} "
                                 f"({type(e).__name__}: {e})") from None
    _check_checkpoint_matches(out_dir, config, state)
    return config, state


def _check_checkpoint_matches(out_dir: pathlib.Path, config: KipConfig, state: KipState) -> None:
    """A checkpoint and a config.json from two different runs (a mixed folder) are refused, not continued."""
    images, labels = np.asarray(state.images), np.asarray(state.labels)
    problems = []
    if images.ndim != 4 or labels.ndim != 2 or len(images) != len(labels):
        problems.append(f"support arrays of shapes {images.shape} and {labels.shape}")
    elif len(images) != config.per_class * labels.shape[1]:
        problems.append(f"{len(images)} support images where {CONFIG} says {config.per_class} per class for "
                        f"{labels.shape[1]} classes")
    elif np.shape(state.best_images) != images.shape or np.shape(state.best_labels) != labels.shape:
        problems.append("a best support of another shape than the support")
    elif state.step < 0 or np.shape(state.key) != (2,):
        problems.append(f"step {state.step} and a random key of shape {np.shape(state.key)}")
    if problems:
        raise KernelDistillError(f"cannot resume from {out_dir}: {CHECKPOINT} holds {problems[0]} (the folder mixes "
                                 f"two runs, or was edited); start a new run")


def read_metrics(path: pathlib.Path, up_to_step: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to ``up_to_step`` (a resumed run drops what came after its checkpoint)."""
    return [r for r in runs.read_json_lines(path) if r.get("step", 0) <= up_to_step]


def check_resume(out_dir: pathlib.Path, config: KipConfig,
                 flag_of: Callable[[str], str] = config_flag) -> tuple[KipState, dict]:
    """Load the checkpoint of ``out_dir`` and check that ``config`` may continue it.

    Returns the state and the allowed changes ``{field: [saved, new]}``; raises naming the option of any
    other change, or when ``config.steps`` does not lie beyond the checkpoint.
    """
    saved, state = load_checkpoint(out_dir)
    changes = runs.resume_changes(saved.to_dict(), config.to_dict(), RESUMABLE_FIELDS, flag_of)
    if config.steps < state.step or (config.steps == state.step and outputs_complete(out_dir, state.step)):
        raise KernelDistillError(f"the checkpoint in {out_dir} is at step {state.step} and the run asks for "
                                 f"{config.steps} steps in all: nothing to do; give --steps above {state.step}")
    return state, changes


def outputs_complete(out_dir: pathlib.Path, step: int) -> bool:
    """Whether ``out_dir`` holds every output of its checkpoint's ``step``: ``results.json`` (written last)
    says that step and each artifact it names exists. A run killed after its last checkpoint but before or
    during these writes is not complete, and ``--resume`` finishes it without new steps."""
    try:
        record = json.loads((out_dir / "results.json").read_text())
        recorded_step = record["metrics"]["steps"]
        artifacts = record["artifacts"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return recorded_step == step and all((out_dir / name).is_file() for name in artifacts)


def checkpoint_step(out_dir: pathlib.Path) -> int | str:
    """The step of the checkpoint in ``out_dir``, or ``\"none written\"`` (for an error message)."""
    try:
        with np.load(out_dir / CHECKPOINT) as f:
            return int(f["step"])
    except Exception:
        return "none written"
