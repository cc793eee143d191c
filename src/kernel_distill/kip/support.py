"""The support a KIP run starts from: real images, noise, or a distilled set (a warm start)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from kernel_distill.data import PreparedData
from kernel_distill.errors import KernelDistillError
from kernel_distill.checksums import file_sha256
from kernel_distill.kip.config import KipConfig
from kernel_distill.kip.state import KipState
from kernel_distill.kip.step import _state_params
from kernel_distill.preprocess import centered_one_hot

if TYPE_CHECKING:
    import optax


def initial_state(config: KipConfig, data: PreparedData, optimizer: optax.GradientTransformation) -> KipState:
    from kernel_distill.data import class_balanced_indices

    key = jax.random.PRNGKey(config.seed)
    key, init_key = jax.random.split(key)
    if config.init == "file":
        images, labels = warm_start_support(config, data)
    else:
        idx = class_balanced_indices(data.y_train, config.per_class, data.num_classes, init_key)
        labels = centered_one_hot(data.y_train[idx], data.num_classes).astype(config.dtype)
        if config.init == "real":
            images = data.x_train[idx].astype(config.dtype)
        else:
            images = np.asarray(jax.random.normal(init_key, data.x_train[idx].shape), config.dtype)
    state = KipState(step=0, images=images, labels=labels, opt_leaves=[], key=np.asarray(key),
                     best_images=images.copy(), best_labels=labels.copy())
    opt_state = optimizer.init(_state_params(state, config))
    return dataclasses.replace(state, opt_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(opt_state)])


def warm_start_support(config: KipConfig, data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``config.init_file``, checked to fit the run: ``(n, H, W, C)``, ``(n, C)``.

    The set must be of the run's dataset, hold ``per_class`` images per class, and have been preprocessed
    exactly as the run preprocesses (same channel statistics, same ZCA or none: the same validation split
    and ``--zca`` settings), since its images live in that space. Anything else is refused with one line.
    """
    from kernel_distill.io import dataset_of, load_distilled

    source = config.init_file
    if source is None:
        raise KernelDistillError("this run has no init_file to start its support from")
    if config.init_sha256 is not None and file_sha256(source) != config.init_sha256:
        raise KernelDistillError(f"{source}: its sha256 is not the one this run recorded "
                                 f"({config.init_sha256[:12]}...): the file changed since the run started")
    distilled = load_distilled(source)
    dataset_of(distilled, source, data.name)
    want = config.per_class * data.num_classes
    if distilled.images.shape[1:] != data.x_train.shape[1:] or distilled.num_classes != data.num_classes:
        raise KernelDistillError(f"{source}: images {distilled.images.shape[1:]} with {distilled.num_classes} classes "
                                 f"do not fit {data.name} ({data.x_train.shape[1:]}, {data.num_classes} classes)")
    if len(distilled.images) != want:
        raise KernelDistillError(f"{source} holds {len(distilled.images)} images, not {config.per_class} per class "
                                 f"({want}): set --per-class {len(distilled.images) / data.num_classes:g}")
    mine, theirs = data.preprocessor, distilled.preprocessor
    if theirs is None:
        raise KernelDistillError(f"{source} does not record its preprocessing (a released KIP file?): its images "
                                 f"cannot be placed in this run's input space")
    # The zoo stores large ZCA matrices in float16, hence the looser tolerance for them.
    same = (np.allclose(mine.mean, theirs.mean, rtol=1e-5, atol=1e-7)
            and np.allclose(mine.std, theirs.std, rtol=1e-5, atol=1e-7)
            and mine.uses_zca == theirs.uses_zca
            and (not mine.uses_zca or (mine.zca_matrix is not None and theirs.zca_matrix is not None
                                       and mine.zca_layer_norm == theirs.zca_layer_norm and np.allclose(
                mine.zca_matrix, theirs.zca_matrix, rtol=1e-2, atol=1e-3 * float(np.abs(mine.zca_matrix).max())))))
    if not same:
        raise KernelDistillError(
            f"{source} was preprocessed differently from this run (channel statistics or ZCA); a warm start needs "
            f"the same --zca/--zca-reg and --val-size as the run that made it")
    return distilled.images.astype(config.dtype), distilled.labels.astype(config.dtype)
