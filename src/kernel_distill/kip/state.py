"""The resumable state of a KIP run: host arrays, frozen; the loop makes a new one at every change."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KipState:
    """The resumable state of a run (host numpy arrays): what a checkpoint holds.

    Frozen: the loop derives each new state with :func:`dataclasses.replace`, so a state handed to a
    checkpoint or to the outputs is never changed behind their back.
    """

    step: int
    images: np.ndarray  # float32 or float64 (the run's dtype) (n, H, W, C)
    labels: np.ndarray  # same dtype (n, num_classes)
    opt_leaves: list  # optax state leaves, host arrays, in the optimiser state's tree order (a list: callers
    # concatenate it)
    key: np.ndarray  # uint32 (2,)
    best_images: np.ndarray
    best_labels: np.ndarray
    best_accuracy: float = -1.0  # on the selection split (validation, or test with select_on="test")
    best_step: int = -1
    last_accuracy: float | None = None  # test accuracy of the current support
    best_test_accuracy: float | None = None  # test accuracy of the best support
    last_val_accuracy: float | None = None
    log_scale: float = 0.0  # the Platt scale's logarithm (loss="platt"; stays 0 otherwise)
