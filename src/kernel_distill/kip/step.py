"""The KIP step: target sampling, the KRR objective's gradients, one Adam update.

:func:`make_step` is one jitted function of the run's arrays (the kernel blocks on the local backend, or a
random-feature kernel's features); :func:`make_backend_step` is the same step with the kernel work on another
backend (Ray workers), where only the sampling and the update are compiled here. Both get their loss and
gradients from :mod:`kernel_distill.objective`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernel_distill import objective
from kernel_distill.distributed import LocalBackend
from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelFn
from kernel_distill.kip.config import KipConfig
from kernel_distill.kip.state import KipState

if TYPE_CHECKING:
    from jax.typing import ArrayLike

    from kernel_distill.distributed import Backend
    from kernel_distill.kernels import RandomFeatureKernelFn
    from kernel_distill.kernels.api import Get

    # (params, opt_state, key, fixed_labels, x_train, y_train) -> (params, opt_state, key, loss)
    KipStep = Callable[..., tuple[dict, Any, jax.Array, jax.Array]]


def class_index_table(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of each class, padded: ``(num_classes, max_count)`` int32 and counts ``(num_classes,)``."""
    groups = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = np.array([len(g) for g in groups], np.int32)
    table = np.zeros((num_classes, max(counts.max(), 1)), np.int32)
    for c, g in enumerate(groups):
        table[c, :len(g)] = g
    return table, counts


def sample_balanced(key: jax.Array, table: jax.Array, counts: jax.Array, per_class: int) -> jax.Array:
    """``per_class`` distinct indices of every class, drawn with ``key``. Returns int ``(C * per_class,)``."""
    max_count = table.shape[1]

    def one_class(k, row, count):
        weights = (jnp.arange(max_count) < count).astype(jnp.float32)
        picks = jax.random.choice(k, max_count, (per_class,), replace=False, p=weights / count)
        return row[picks]

    keys = jax.random.split(key, table.shape[0])
    return jax.vmap(one_class)(keys, table, counts).reshape(-1)


def make_optimizer(config: KipConfig) -> optax.GradientTransformation:
    """Adam at ``config.learning_rate``, over every optimised array (images, labels, the Platt log scale)."""
    return optax.adam(config.learning_rate)


def _params(images, labels, learn_labels: bool, log_scale=None) -> dict:
    """The optimised arrays: images, labels with ``learn_labels``, the Platt log scale unless ``None``."""
    params = {"images": images, "labels": labels} if learn_labels else {"images": images}
    if log_scale is not None:
        params["log_scale"] = log_scale
    return params


def _state_params(state: KipState, config: KipConfig) -> dict:
    """The optimised arrays of a (host) state, as device arrays in the run's dtype."""
    log_scale = jnp.asarray(state.log_scale, config.dtype) if config.loss == "platt" else None
    return _params(jnp.asarray(state.images), jnp.asarray(state.labels), config.learn_labels, log_scale)


def krr_loss_and_gradients(kernel_fn: KernelFn, get: Get, reg: float, x_s: jax.Array, y_s: ArrayLike, x_t: jax.Array,
                           y_t: ArrayLike, log_scale: ArrayLike | None = None) -> tuple[jax.Array, ...]:
    """The KRR loss of a support on a target batch, and its gradients, through the kernel block API.

    :func:`kernel_distill.objective.loss_and_gradients` with the blocks computed here (the local backend):
    the same numbers as ``jax.grad`` of the whole loss (tested to 1e-10 in float64). Pure JAX (jit it).

    Args:
      x_s: ``(n, ...)`` support images; y_s: ``(n, C)`` support labels; x_t: ``(m, ...)``, y_t: ``(m, C)``.
      log_scale: ``None`` for the mean squared error, or a scalar for the Platt loss with that log scale.
    Returns:
      ``(loss, dL/dx_s, dL/dy_s)``, and ``dL/dlog_scale`` as a fourth item with ``log_scale``.
    """
    return objective.loss_and_gradients(LocalBackend(), kernel_fn, get, reg, x_s, y_s, x_t, None, y_t, log_scale)


def make_step(kernel_fn: KernelFn | RandomFeatureKernelFn, config: KipConfig, optimizer: optax.GradientTransformation,
              table: jax.Array, counts: jax.Array, per_class_target: int) -> KipStep:
    """The jitted KIP step ``(params, opt_state, key, fixed_labels, x_train, y_train) -> (..., loss)``.

    With a random-feature kernel the step draws its networks from the run's key (a third split of the
    step's key) unless ``config.rf_fixed_networks``; the gradient goes through the features directly.
    """
    random_features = config.kernel.random_features is not None

    @jax.jit
    def step(params, opt_state, key, fixed_labels, x_train, y_train):
        if random_features:
            key, sample_key, network_key = jax.random.split(key, 3)
        else:
            key, sample_key = jax.random.split(key)
        idx = sample_balanced(sample_key, table, counts, per_class_target)
        labels = params.get("labels", fixed_labels)
        log_scale = params.get("log_scale")
        if random_features:
            out = objective.random_feature_loss_and_gradients(
                config.kernel, None if config.rf_fixed_networks else network_key, config.reg, params["images"],
                labels, x_train[idx], y_train[idx], kernel_fn.tile_budget(), learn_labels="labels" in params,
                log_scale=log_scale)
        else:
            out = objective.loss_and_gradients(LocalBackend(), kernel_fn, config.get, config.reg, params["images"],
                                               labels, x_train, idx, y_train[idx], log_scale=log_scale)
        loss, d_images, d_labels = out[:3]
        grads = _params(d_images, d_labels, "labels" in params, out[3] if log_scale is not None else None)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    return step


def make_backend_step(backend: Backend, kernel_fn: KernelFn | RandomFeatureKernelFn, config: KipConfig,
                      optimizer: optax.GradientTransformation, table: jax.Array, counts: jax.Array,
                      per_class_target: int, train: Any) -> KipStep:
    """The KIP step of :func:`make_step` with the kernel work on ``backend`` (e.g. Ray workers).

    Same signature and same numbers (up to summation order) as :func:`make_step`: the target batch is
    drawn here with the same key chain, sent to the backend as indices into ``train`` (the training
    images the backend holds, from ``backend.put``), and the optimiser update runs here. It cannot be one
    ``jax.jit``: the kernel blocks are computed in other processes.
    """

    @jax.jit
    def sample(key):
        key, sample_key = jax.random.split(key)
        return key, sample_balanced(sample_key, table, counts, per_class_target)

    @jax.jit
    def update(params, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(params, opt_state, key, fixed_labels, x_train, y_train):
        key, idx = sample(key)
        labels = params.get("labels", fixed_labels)
        loss, d_images, d_labels = objective.backend_loss_and_gradients(
            backend, kernel_fn, config.get, config.reg, params["images"], labels, train, np.asarray(idx),
            y_train[idx])
        grads = {"images": d_images, "labels": d_labels} if "labels" in params else {"images": d_images}
        params, opt_state = update(params, grads, opt_state)
        return params, opt_state, key, loss

    return step


def step_for_backend(backend: Backend | None, kernel_fn: KernelFn | RandomFeatureKernelFn, config: KipConfig,
                     optimizer: optax.GradientTransformation, table: jax.Array, counts: jax.Array,
                     per_class_target: int, x_train: np.ndarray) -> tuple[KipStep, Backend | None]:
    """The run's step on ``backend`` and the backend its evaluations use: ``(step, backend or None)``.

    No backend, or the local one: :func:`make_step`, one jitted function, and evaluations here (``None``).
    Another backend: :func:`make_backend_step` on the training images handed to it once (``x_train``, in
    the run's dtype). The Platt loss and random-feature kernels run on the local backend only (refused with
    one line, before any work).
    """
    if backend is None or isinstance(backend, LocalBackend):
        return make_step(kernel_fn, config, optimizer, table, counts, per_class_target), None
    if config.loss != "mse":
        raise KernelDistillError(f"KIP with --loss {config.loss} runs on the local backend only; --backend ray "
                                 f"distributes the mean squared error")
    if config.kernel.random_features is not None:
        raise KernelDistillError(f"KIP with the {config.kernel.name} kernel runs on the local backend only (its step "
                                 f"is a few random networks' features, not kernel blocks); --backend ray serves "
                                 f"its evaluations in label-solve, evaluate and baseline")
    train = backend.put(np.asarray(x_train, config.dtype))
    return make_backend_step(backend, kernel_fn, config, optimizer, table, counts, per_class_target, train), backend
