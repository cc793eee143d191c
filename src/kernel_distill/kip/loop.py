"""The KIP run: steps, evaluations, metrics and checkpoints, from a fresh start or a checkpoint.

The loop passes its state along instead of changing it in place: :class:`DeviceState` (the arrays a step
reads and returns) and :class:`~kernel_distill.kip.state.KipState` (host arrays: what a checkpoint holds)
are frozen, and each function below returns a new one. ``records`` (the metrics so far) is a tuple, extended
by :func:`_logged`, which also appends the record to ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill import runs
from kernel_distill.data import PreparedData
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import atomic_write_text
from kernel_distill.kernels import make_kernel_fn
from kernel_distill.kip.checkpoint import (CONFIG, METRICS, check_resume, checkpoint_step, read_metrics,
                                           save_checkpoint)
from kernel_distill.kip.config import KipConfig, check_feasible
from kernel_distill.kip.outputs import write_outputs
from kernel_distill.kip.state import KipState
from kernel_distill.kip.step import _state_params, class_index_table, make_optimizer, step_for_backend
from kernel_distill.kip.support import initial_state
from kernel_distill.preprocess import centered_one_hot

if TYPE_CHECKING:
    from kernel_distill.distributed import Backend


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What a step reads and returns: the optimised arrays (``images``, with ``learn_labels`` ``labels``,
    with the Platt loss ``log_scale``), the optimiser state, and the random key (uint32 ``(2,)``)."""

    params: dict
    opt_state: Any
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What stays the same for a whole run: its config, data and folder, the compiled step, the target
    arrays on the device, and the evaluation (``evaluate_fn``, on ``backend``, ``None``: here)."""

    config: KipConfig
    data: PreparedData
    out_dir: pathlib.Path
    kernel_fn: Any
    step_fn: Callable
    backend: Any
    evaluate_fn: Callable
    fixed_labels: jax.Array  # the support labels when they are not learned
    x_train: jax.Array
    y_train: jax.Array


def run_in_folder(config: KipConfig, data: PreparedData, out_dir: pathlib.Path, resume: bool, progress: bool,
                  log: Callable[[str], None], command_line: list[str] | None, backend: Backend | None,
                  evaluate_fn: Callable,
                  available_bytes: Callable[[], int]) -> dict:
    """Run (or resume) KIP in a folder this run has claimed; returns the summary of :func:`write_outputs`.

    ``evaluate_fn``: :func:`kernel_distill.krr.evaluate` or a stand-in; ``available_bytes``: the memory a
    step must fit in, asked for when the run is checked against the data.
    """
    started = time.perf_counter()
    state, changes = check_resume(out_dir, config) if resume else (None, None)
    per_class_target = check_feasible(config, data, available_bytes())
    kernel_fn = make_kernel_fn(config.kernel, memory_budget_bytes=int(config.memory_budget_mb * 2**20))
    optimizer = make_optimizer(config)
    table, counts = class_index_table(data.y_train, data.num_classes)
    step_fn, backend = step_for_backend(backend, kernel_fn, config, optimizer, jnp.asarray(table),
                                        jnp.asarray(counts), per_class_target, data.x_train)
    if not resume:
        state = initial_state(config, data, optimizer)
    assert state is not None  # check_resume returns a state when resuming, initial_state otherwise
    device = _device_state(state, config, optimizer, out_dir)
    if resume and (state.images.shape[1:] != data.x_train.shape[1:] or state.labels.shape[1] != data.num_classes):
        raise KernelDistillError(f"cannot resume from {out_dir}: its support ({state.images.shape[1:]} images, "
                                 f"{state.labels.shape[1]} classes) does not fit {data.name}")
    backend_record = backend.describe() if backend is not None else {"backend": "local"}
    if resume:
        records = tuple(read_metrics(out_dir / METRICS, state.step))
        runs.append_history(out_dir, "resume", state.step, changes=changes, backend=backend_record)
    else:
        records = ()
        runs.append_history(out_dir, "start", 0, config=config.to_dict(), backend=backend_record)
    atomic_write_text(out_dir / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    inputs = RunInputs(config, data, out_dir, kernel_fn, step_fn, backend, evaluate_fn,
                       fixed_labels=jnp.asarray(state.labels), x_train=jnp.asarray(data.x_train, config.dtype),
                       y_train=jnp.asarray(centered_one_hot(data.y_train, data.num_classes), config.dtype))

    if state.step == 0 and not records:
        state, record = _evaluated(inputs, state)
        records = _logged(out_dir, records, record)
    if not resume:  # a run killed before its first periodic checkpoint resumes from here
        save_checkpoint(out_dir, state)
    state, device, records, interrupted = _steps(inputs, state, device, records, progress)
    state = _synced(inputs, state, device)
    save_checkpoint(out_dir, state)
    summary = write_outputs(config, data, state, list(records), out_dir, wall_seconds=time.perf_counter() - started,
                            command_line=command_line)
    if interrupted:
        log(f"interrupted at step {state.step}: checkpoint and outputs written to {out_dir}; "
            f"continue with --resume {out_dir}")
        raise KeyboardInterrupt
    return summary


def _steps(inputs: RunInputs, state: KipState, device: DeviceState, records: tuple, progress: bool):
    """Steps until ``config.steps``, logging, evaluating and checkpointing at their intervals; Ctrl-C stops
    after the last whole step. Returns ``(state, device, records, interrupted)``: ``device`` is the last
    step's, ``state`` may lag behind it (the caller syncs it)."""
    from tqdm.auto import tqdm

    config, out_dir = inputs.config, inputs.out_dir
    interrupted = False
    bar = tqdm(total=config.steps, initial=state.step, desc="KIP", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while state.step < config.steps:
            next_device, loss = _checked_step(inputs, device, state.step)
            device, state = next_device, dataclasses.replace(state, step=state.step + 1)  # one assignment
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == config.steps:
                records = _logged(out_dir, records, _loss_record(state.step, loss, device.params))
            if state.step % config.eval_every == 0 or state.step == config.steps:
                state, record = _evaluated(inputs, _synced(inputs, state, device))
                records = _logged(out_dir, records, record)
            bar.set_postfix(loss=f"{loss:.3g}", val=_pct(state.last_val_accuracy), test=_pct(state.last_accuracy),
                            refresh=False)
            if state.step % config.checkpoint_every == 0:
                state = _synced(inputs, state, device)
                save_checkpoint(out_dir, state)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return state, device, records, interrupted


def _device_state(state: KipState, config: KipConfig, optimizer, out_dir: pathlib.Path) -> DeviceState:
    """The device arrays of a host state; its optimiser leaves are checked to fit this config's optimiser."""
    params = _state_params(state, config)
    fresh = optimizer.init(params)
    treedef, fresh_leaves = jax.tree_util.tree_structure(fresh), jax.tree_util.tree_leaves(fresh)
    num_leaves = treedef.num_leaves  # type: ignore[attr-defined]  # jax's PyTreeDef stub lacks num_leaves
    if num_leaves != len(state.opt_leaves) or any(
            np.shape(a) != np.shape(b) for a, b in zip(fresh_leaves, state.opt_leaves)):
        raise KernelDistillError(f"cannot resume from {out_dir}: its optimiser state does not match this config")
    opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in state.opt_leaves])
    return DeviceState(params, opt_state, jnp.asarray(state.key))


def _checked_step(inputs: RunInputs, device: DeviceState, step: int) -> tuple[DeviceState, float]:
    """One step from ``device``: the new device state and the loss before its update. A NaN or inf loss or
    support raises (the last good checkpoint stays)."""
    params, opt_state, key, loss = inputs.step_fn(device.params, device.opt_state, device.key, inputs.fixed_labels,
                                                  inputs.x_train, inputs.y_train)
    loss = float(loss)
    finite_support = all(bool(jnp.all(jnp.isfinite(v))) for v in params.values())
    if not math.isfinite(loss) or not finite_support:
        what = (f"the KRR loss became {loss}" if not math.isfinite(loss) else
                f"the support became NaN or inf (loss {loss:.4g} before the update)")
        raise KernelDistillError(
            f"{what} at step {step + 1}; stopped. {inputs.out_dir} keeps the last good checkpoint "
            f"(step {checkpoint_step(inputs.out_dir)}); a resume would repeat this: start a new run with a lower "
            f"--lr or a higher --reg")
    return DeviceState(params, opt_state, key), loss


def _synced(inputs: RunInputs, state: KipState, device: DeviceState) -> KipState:
    """``state`` with the device arrays of ``device`` (host copies): what a checkpoint or an evaluation reads."""
    params = device.params
    return dataclasses.replace(
        state, images=np.asarray(params["images"]),
        labels=np.asarray(params["labels"]) if inputs.config.learn_labels else np.asarray(inputs.fixed_labels),
        opt_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(device.opt_state)],
        key=np.asarray(device.key), log_scale=float(params["log_scale"]) if "log_scale" in params else 0.0)


def _evaluated(inputs: RunInputs, state: KipState) -> tuple[KipState, dict]:
    """KRR accuracy of the (synced) support on the validation and test sets; the state with the new
    accuracies, and the best support if this one beats it on the selection split; and the metrics record."""
    config, data = inputs.config, inputs.data
    record: dict[str, float] = {"step": state.step}
    last_val_accuracy = state.last_val_accuracy
    if data.num_val:
        val = inputs.evaluate_fn(inputs.kernel_fn, state.images, state.labels, data.x_val, data.y_val, reg=config.reg,
                                 get=config.get, progress=False, backend=inputs.backend)
        last_val_accuracy = val.accuracy
        record.update(val_accuracy=val.accuracy, val_loss=val.mse_loss)
    result = inputs.evaluate_fn(inputs.kernel_fn, state.images, state.labels, data.x_test[:config.test_limit],
                                data.y_test[:config.test_limit], reg=config.reg, backend=inputs.backend,
                                get=config.get, progress=False)
    state = dataclasses.replace(state, last_accuracy=result.accuracy, last_val_accuracy=last_val_accuracy)
    selected = result.accuracy if config.select_on == "test" else last_val_accuracy
    if selected is None:
        raise KernelDistillError("select_on='val' needs a validation split")
    if selected > state.best_accuracy:
        state = dataclasses.replace(state, best_accuracy=selected, best_step=state.step,
                                    best_test_accuracy=result.accuracy, best_images=state.images.copy(),
                                    best_labels=state.labels.copy())
    record.update(test_accuracy=result.accuracy, test_loss=result.mse_loss, time=time.time())
    return state, record


def _loss_record(step: int, loss: float, params: dict) -> dict:
    record = {"step": step, "loss": loss}
    if "log_scale" in params:
        record["platt_scale"] = math.exp(float(params["log_scale"]))
    return record


def _logged(out_dir: pathlib.Path, records: tuple, record: dict) -> tuple:
    """``records`` with ``record`` appended, and the record appended to ``metrics.jsonl``."""
    runs.append_line(out_dir / METRICS, json.dumps(record))
    return (*records, record)


def _pct(value):
    return "-" if value is None or value < 0 else f"{100 * value:.2f}%"
