"""KIP (Kernel Inducing Points): learn a small support set by gradient descent through the KRR loss.

Each step draws a fresh class-balanced target batch ``(X_t, y_t)`` from the whole training set and takes
one Adam step on the support images (and, with ``learn_labels``, the support labels) against

    loss = 0.5 * mean((K_ts (K_ss + reg * tr(K_ss)/n I)^-1 y_s - y_t)^2)

(Nguyen, Chen & Lee, ICLR 2021; Nguyen, Novak, Xiao & Lee, NeurIPS 2021), or with ``loss="platt"`` RFAD's
cross-entropy of the predictions scaled by a learned ``exp(log_scale)`` (Loo et al., NeurIPS 2022; see
:func:`kernel_distill.krr.krr_platt_loss`). The target batches come from
the training split *minus* a class-balanced validation set. Every ``eval_every`` steps the support is
scored by KRR on the validation set and on the test set; the support with the best *validation* accuracy
is kept beside the last one (``select_on="test"`` selects on the test set instead, as the KIP papers did:
only for reproducing them, and it is written in the outputs). Every
``checkpoint_every`` steps, and on Ctrl-C, the complete state (support, labels, optimiser state, random
key, step, best support) is written atomically, so ``resume`` continues exactly where the run stopped:
the random key chain and the optimiser state make a resumed run step-for-step identical to an
uninterrupted one.

The package, by concern: :mod:`~kernel_distill.kip.config` (the run's definition and its checks against the
data), :mod:`~kernel_distill.kip.step` (target sampling and one Adam step through the KRR objective of
:mod:`kernel_distill.objective`), :mod:`~kernel_distill.kip.support` (the initial support),
:mod:`~kernel_distill.kip.state` and :mod:`~kernel_distill.kip.checkpoint` (the resumable state and its file),
:mod:`~kernel_distill.kip.loop` (the run) and :mod:`~kernel_distill.kip.outputs` (the distilled sets,
figures and ``results.json``). Every name is also this package's, where callers have always found it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Callable

import jax

from kernel_distill import runs
from kernel_distill.data import PreparedData
from kernel_distill.kip.checkpoint import (CHECKPOINT, CONFIG, METRICS, check_resume, load_checkpoint,
                                           outputs_complete, save_checkpoint)
from kernel_distill.kip.config import (CONFIG_FLAGS, DEFAULT_FC_TARGET_BATCH, DEFAULT_TARGET_BATCH, KIP_FC_DEPTH,
                                       RESUMABLE_FIELDS, KipConfig, available_memory_bytes, check_feasible,
                                       config_flag, kernel_default_target_batch, prepare_for)
from kernel_distill.kip.loop import run_in_folder
from kernel_distill.kip.outputs import RUN_FILES, write_outputs
from kernel_distill.kip.state import KipState
from kernel_distill.kip.step import (_state_params, class_index_table, krr_loss_and_gradients,  # noqa: F401
                                     make_backend_step, make_optimizer, make_step, sample_balanced, step_for_backend)
from kernel_distill.kip.support import initial_state, warm_start_support
from kernel_distill.krr import evaluate

if TYPE_CHECKING:
    from kernel_distill.distributed import Backend


def run_kip(config: KipConfig, data: PreparedData, out_dir: str | os.PathLike, resume: bool = False,
            progress: bool = True, log: Callable[[str], None] = print, overwrite: bool = False,
            command_line: list[str] | None = None, backend: Backend | None = None) -> dict:
    """Run (or resume) KIP, writing everything into ``out_dir``. Returns a summary dict.

    The folder belongs to this run (:func:`kernel_distill.runs.claim_run_folder`): a new run refuses a
    non-empty folder unless ``overwrite``, and a live run holds its lock. A resumed run must use the saved
    config except for :data:`RESUMABLE_FIELDS`, and ``config.steps`` must lie beyond the checkpoint.
    A step-0 checkpoint is written before the first step, so a run killed at any point can be resumed.
    On Ctrl-C the state is checkpointed and outputs are written before ``KeyboardInterrupt`` propagates.
    A NaN or inf loss or support stops the run with :class:`KernelDistillError`; the last good checkpoint
    stays. ``command_line`` goes into ``results.json`` (default ``sys.argv``). ``config.float64`` turns
    on JAX's 64-bit mode for the run (and only for it).
    """
    with runs.claim_run_folder(out_dir, resume=resume, overwrite=overwrite, run_files=RUN_FILES,
                               command="kip") as folder:
        with jax.enable_x64(True) if config.float64 else contextlib.nullcontext():
            # ``evaluate`` and ``available_memory_bytes`` are read from this package when the run starts, so a
            # caller (a test) may replace them here
            return run_in_folder(config, data, folder, resume, progress, log, command_line, backend,
                                 evaluate_fn=evaluate, available_bytes=available_memory_bytes)


__all__ = ["CHECKPOINT", "CONFIG", "CONFIG_FLAGS", "DEFAULT_FC_TARGET_BATCH", "DEFAULT_TARGET_BATCH", "KIP_FC_DEPTH",
           "METRICS", "RESUMABLE_FIELDS", "RUN_FILES",
           "KipConfig", "KipState", "available_memory_bytes", "check_feasible", "check_resume", "class_index_table",
           "config_flag", "evaluate", "initial_state", "kernel_default_target_batch", "krr_loss_and_gradients",
           "load_checkpoint",
           "make_backend_step", "make_optimizer", "make_step", "outputs_complete", "prepare_for", "run_kip",
           "sample_balanced", "save_checkpoint", "step_for_backend", "warm_start_support", "write_outputs"]
