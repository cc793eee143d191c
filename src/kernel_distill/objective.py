"""The KRR objective of KIP, written once: the loss, its forward over kernel blocks, and its VJP back to the support.

For a support set ``(X_s, y_s)`` of ``n`` points and a target batch ``(X_t, y_t)`` of ``m`` points::

    pred = K_ts (K_ss + reg * trace(K_ss) / n * I)^-1 y_s
    loss = 0.5 * mean((pred - y_t)^2)                          (KIP's mean squared error, "mse")
    loss = mean(CE(exp(log_scale) * pred, argmax y_t))          (RFAD's Platt-scaled cross-entropy, "platt")

The regulariser is relative to the mean eigenvalue of ``K_ss`` (KIP's convention), so ``reg`` means the
same across kernels and scales.

:func:`loss_and_gradients` takes the gradient through the kernel blocks in three stages, so that the
kernel work may run anywhere: a :class:`BlockExecutor` computes the blocks ``K_ts`` and ``K_ss`` forward,
this module takes ``jax.vjp`` of the loss with respect to the blocks (an ``n x n`` Cholesky: cheap, done
where the caller runs), and the executor maps the blocks' cotangents back to the support images through
the kernel's block VJPs, summed over however it split the work. The same numbers as ``jax.grad`` of the whole
loss (tested to 1e-10 in float64), whatever the executor. :class:`kernel_distill.distributed.LocalBackend`
is the executor in this process (pure JAX: the whole objective then compiles into one ``jax.jit``);
:class:`~kernel_distill.distributed.ray_backend.RayBackend` spreads the blocks over Ray workers.

A random-feature kernel (RFAD) has no block VJPs to distribute: its gradient goes through a few random
networks' features directly (:func:`random_feature_loss_and_gradients`), with the same loss.

This module sits between the kernels and the algorithms: it imports :mod:`kernel_distill.kernels` and
nothing of KIP, KRR evaluation or the backends. KIP and :mod:`kernel_distill.krr` import it; the backends
implement its protocol without importing it (:func:`backend_loss_and_gradients` takes a backend and drives
its blocks).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Hashable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.kernels import random_features as rf
from kernel_distill.kernels.spec import KernelSpec

if TYPE_CHECKING:
    from jax.typing import ArrayLike

    from kernel_distill.kernels import KernelFn
    from kernel_distill.kernels.api import Get

DEFAULT_REG = 1e-6

KIP_LOSSES = ("mse", "platt")


# ----------------------------------------------------------------------------------------------------
# The loss as a function of the kernel blocks.


def ridge(k: np.ndarray | jax.Array, reg: float = DEFAULT_REG) -> np.floating | jax.Array:
    """The ridge ``reg * trace(K) / n`` added to a kernel's diagonal: KIP's regulariser, relative to the
    mean eigenvalue. ``k``: a square numpy or JAX array. Returns a scalar of the same kind."""
    return reg * k.trace() / k.shape[0]


def regularized(k_ss: jax.Array, reg: float = DEFAULT_REG) -> jax.Array:
    """``K_ss + reg * trace(K_ss) / n * I``. ``(n, n) -> (n, n)``."""
    return k_ss + ridge(k_ss, reg) * jnp.eye(k_ss.shape[0], dtype=k_ss.dtype)


def krr_predict(k_ts: ArrayLike, k_ss: jax.Array, y_s: ArrayLike, reg: float = DEFAULT_REG) -> jax.Array:
    """KRR predictions by a Cholesky solve.

    Args:
      k_ts: ``(n_t, n)`` kernel between targets and support.
      k_ss: ``(n, n)`` support kernel.
      y_s: ``(n, C)`` support labels.
      reg: relative ridge regulariser.
    Returns:
      ``(n_t, C)`` predictions, in the dtype of the kernels.
    """
    factor = jax.scipy.linalg.cho_factor(regularized(k_ss, reg), lower=True)
    return jnp.matmul(k_ts, jax.scipy.linalg.cho_solve(factor, y_s), precision=jax.lax.Precision.HIGHEST)


def krr_loss(k_ts: ArrayLike, k_ss: jax.Array, y_s: ArrayLike, y_t: ArrayLike,
             reg: float = DEFAULT_REG) -> jax.Array:
    """``0.5 * mean((pred - y_t)^2)`` over all entries of the ``(n_t, C)`` predictions. Scalar."""
    return 0.5 * jnp.mean((krr_predict(k_ts, k_ss, y_s, reg) - y_t) ** 2)


def krr_platt_loss(k_ts: ArrayLike, k_ss: jax.Array, y_s: ArrayLike, y_t: ArrayLike, log_scale: ArrayLike,
                   reg: float = DEFAULT_REG) -> jax.Array:
    """RFAD's Platt-scaled cross-entropy of the KRR predictions: ``mean(CE(exp(log_scale) * pred, argmax y_t))``.

    The KRR predictions are read as logits after a learned scale ``exp(log_scale)`` (Platt scaling; Loo et
    al., NeurIPS 2022), so the loss asks for the right class to win rather than for every output to equal
    its centred one-hot value. ``log_scale``: a scalar, learned beside the support. Scalar, in the dtype of
    the kernels.
    """
    logits = jnp.exp(log_scale) * krr_predict(k_ts, k_ss, y_s, reg)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, jnp.argmax(y_t, axis=-1)[:, None], axis=-1))


def kip_loss(k_ts: ArrayLike, k_ss: jax.Array, y_s: ArrayLike, y_t: ArrayLike, reg: float = DEFAULT_REG,
             log_scale: ArrayLike | None = None) -> jax.Array:
    """KIP's objective: :func:`krr_loss` when ``log_scale`` is ``None``, else :func:`krr_platt_loss`."""
    if log_scale is None:
        return krr_loss(k_ts, k_ss, y_s, y_t, reg)
    return krr_platt_loss(k_ts, k_ss, y_s, y_t, log_scale, reg)


@jax.jit
def loss_vjp(k_ts: ArrayLike, k_ss: jax.Array, y_s: ArrayLike, y_t: ArrayLike, reg: float,
             log_scale: ArrayLike | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The loss and its cotangents with respect to the blocks, the support labels and the log scale.

    Args:
      k_ts: ``(m, n)``; k_ss: ``(n, n)``; y_s: ``(n, C)``; y_t: ``(m, C)``; reg: scalar;
      log_scale: ``None`` (mean squared error) or a scalar (Platt loss).
    Returns:
      ``(loss, dL/dK_ts (m, n), dL/dK_ss (n, n), dL/dy_s (n, C), dL/dlog_scale)``, the last ``None``
      without ``log_scale``; all in the dtype of the blocks. Jitted: on a backend whose blocks come from
      other processes this is the one compiled piece of the step that runs here.
    """
    loss, vjp = jax.vjp(lambda kts, kss, ys, scale: kip_loss(kts, kss, ys, y_t, reg, scale), k_ts, k_ss, y_s,
                        log_scale)
    d_kts, d_kss, d_ys, d_log_scale = vjp(jnp.ones_like(loss))
    return loss, d_kts, d_kss, d_ys, d_log_scale


# ----------------------------------------------------------------------------------------------------
# The gradient through kernel blocks, on any executor.


@runtime_checkable
class BlockExecutor(Protocol):
    """Where the kernel blocks of the objective are computed: what a backend offers the objective.

    The objective never looks inside ``residuals``: it is whatever the executor's backward pass needs from
    its forward pass (the local executor: the images and their kernel statistics, traced arrays; the Ray
    backend: the support and its timing record), handed back unchanged. An executor whose methods are pure
    JAX functions can be traced, so :func:`loss_and_gradients` with it can run under ``jax.jit``.
    """

    def forward_blocks(self, kernel_fn: KernelFn, get: Get, x_s: jax.Array, targets: Any,
                       target_idx: jax.Array | np.ndarray | None) -> tuple[Any, Any, Any]:
        """The kernel blocks of a support and a target batch.

        Args:
          kernel_fn: a :class:`kernel_distill.kernels.KernelFn` (its spec and tile budget).
          get: ``"ntk"`` or ``"nngp"``.
          x_s: ``(n, ...)`` support images, float32 or float64: the blocks come back in this dtype.
          targets: the images the target batch is drawn from, ``(N, ...)`` (or what ``put`` returned for
            them, on a backend that holds arrays).
          target_idx: int ``(m,)`` rows of ``targets`` in the batch, or ``None`` for all of them.
        Returns:
          ``(K_ts (m, n), K_ss (n, n), residuals)``.
        """

    def backward_blocks(self, residuals: Any, d_kts: jax.Array, g_ss: jax.Array) -> jax.Array:
        """The support images' cotangent through both blocks, summed over the executor's shares of the work.

        Args:
          residuals: the third item :meth:`forward_blocks` returned.
          d_kts: ``(m, n)`` cotangent of ``K_ts``.
          g_ss: ``(n, n)`` cotangent of ``K_ss`` through its *first* argument: ``G + G^T`` for ``G =
            dL/dK_ss``, since ``K(a, b) = K(b, a)^T`` makes the gradient through both arguments equal to the
            gradient through the first with the symmetrised cotangent (half of the backward work).
        Returns:
          ``dL/dx_s`` ``(n, ...)`` in the dtype of ``x_s``, the kernel statistics' VJP included.
        """


if TYPE_CHECKING:
    class HashableBlockExecutor(BlockExecutor, Hashable, Protocol):
        """A :class:`BlockExecutor` that can key :func:`compiled_loss_and_gradients`'s cache (every backend)."""


def loss_and_gradients(executor: BlockExecutor, kernel_fn: KernelFn, get: Get, reg: float, x_s: jax.Array,
                       y_s: ArrayLike, targets: Any, target_idx: jax.Array | np.ndarray | None, y_t: ArrayLike,
                       log_scale: ArrayLike | None = None) -> tuple[jax.Array, ...]:
    """The KRR loss of a support on a target batch, and its gradients, with the kernel work on ``executor``.

    Kernel blocks forward on the executor, ``jax.vjp`` of the loss for ``dL/dK_ts``, ``dL/dK_ss``,
    ``dL/dy_s`` here, block VJPs backward on the executor: the same numbers as ``jax.grad`` of the whole
    loss. Pure JAX when the executor is (it then runs under ``jax.jit``).

    Args:
      executor: a :class:`BlockExecutor`.
      kernel_fn, get: the kernel and ``"ntk"``/``"nngp"``.
      reg: the relative ridge regulariser.
      x_s: ``(n, ...)`` support images; y_s: ``(n, C)`` support labels.
      targets, target_idx: the target images ``targets[target_idx]`` (see :meth:`BlockExecutor.forward_blocks`).
      y_t: ``(m, C)`` target labels.
      log_scale: ``None`` for the mean squared error, or a scalar for the Platt loss with that log scale.
    Returns:
      ``(loss, dL/dx_s, dL/dy_s)``, and ``dL/dlog_scale`` as a fourth item with ``log_scale``; in the dtype
      of ``x_s``.
    """
    k_ts, k_ss, residuals = executor.forward_blocks(kernel_fn, get, x_s, targets, target_idx)
    loss, d_kts, d_kss, d_ys, d_log_scale = loss_vjp(k_ts, k_ss, y_s, y_t, reg, log_scale)
    dx_s = executor.backward_blocks(residuals, d_kts, d_kss + d_kss.T)
    return (loss, dx_s, d_ys) if log_scale is None else (loss, dx_s, d_ys, d_log_scale)


@functools.lru_cache(maxsize=64)
def compiled_loss_and_gradients(executor: BlockExecutor, kernel_fn: KernelFn,
                                get: Get) -> Callable[..., tuple[jax.Array, ...]]:
    """:func:`loss_and_gradients` on an executor whose block methods are pure JAX, jitted once per executor
    (hashable: equal executors share it), kernel function and ``get``.

    Returns ``f(reg, x_s, y_s, targets, target_idx, y_t, log_scale=None)`` with the results of
    :func:`loss_and_gradients`.
    """
    return jax.jit(functools.partial(loss_and_gradients, executor, kernel_fn, get))


def backend_loss_and_gradients(backend: HashableBlockExecutor, kernel_fn: KernelFn, get: Get, reg: float,
                               x_s: jax.Array, y_s: ArrayLike, targets: Any, target_idx: jax.Array | np.ndarray,
                               y_t: ArrayLike) -> tuple[jax.Array, ...]:
    """:func:`loss_and_gradients` of a KIP step on a backend (:mod:`kernel_distill.distributed`): one compiled
    function on a ``traceable`` backend (its blocks are pure JAX; the target rows are gathered here, so the
    resident set is not copied into the call), the blocks on the backend's workers otherwise.

    Args:
      targets: what ``backend.put`` returned for the target set (or the array); target_idx: ``(m,)`` rows.
    Returns:
      ``(loss, dL/dx_s, dL/dy_s)`` in the dtype of ``x_s``.
    """
    if getattr(backend, "traceable", False):
        x_t = jnp.asarray(np.asarray(targets)[np.asarray(target_idx)], x_s.dtype)
        return compiled_loss_and_gradients(backend, kernel_fn, get)(
            reg, jnp.asarray(x_s), jnp.asarray(y_s), x_t, None, jnp.asarray(y_t))
    return loss_and_gradients(backend, kernel_fn, get, reg, x_s, y_s, targets, target_idx, y_t)


# ----------------------------------------------------------------------------------------------------
# The random-feature kernel: the same loss, differentiated through the features.


def random_feature_loss_and_gradients(spec: KernelSpec, key: jax.Array | None, reg: float, x_s: jax.Array,
                                      y_s: ArrayLike, x_t: jax.Array, y_t: ArrayLike, budget: int,
                                      learn_labels: bool = True,
                                      log_scale: ArrayLike | None = None) -> tuple[jax.Array | None, ...]:
    """The KRR loss of a support on a target batch with the random networks drawn from ``key``, and its gradients.

    The kernel is ``Phi(x) Phi(x')^T`` of a random-feature :class:`KernelSpec` (RFAD); ``key=None`` uses its
    fixed evaluation networks. The gradient goes through the support's features (the target features need
    no backward pass). ``budget``: bytes of activations per chunk of a forward pass.

    Args:
      x_s: ``(n, H, W, C)`` support images; y_s: ``(n, K)``; x_t: ``(m, H, W, C)``; y_t: ``(m, K)``.
      log_scale: ``None``: the mean squared error (:func:`krr_loss`); a scalar: the Platt-scaled
        cross-entropy (:func:`krr_platt_loss`) with that learned log scale.
    Returns:
      ``(loss, dL/dx_s, dL/dy_s)`` (``dL/dy_s`` is ``None`` unless ``learn_labels``), and with ``log_scale``
      also ``dL/dlog_scale`` as a fourth item.
    """
    params = (rf.fixed_network_params(spec, x_s.shape[1:], x_s.dtype) if key is None
              else rf.network_params(spec, key, x_s.shape[1:], x_s.dtype))
    phi_t = jax.lax.stop_gradient(rf.features(spec, params, x_t, budget))

    def loss_fn(xs, ys, scale):
        phi_s = rf.features(spec, params, xs, budget)
        return kip_loss(rf.gram(phi_t, phi_s), rf.gram(phi_s, phi_s), ys, y_t, reg, scale)

    argnums = (0,) + ((1,) if learn_labels else ()) + ((2,) if log_scale is not None else ())
    loss, grads = jax.value_and_grad(loss_fn, argnums=argnums)(x_s, y_s, log_scale)
    grads = dict(zip(argnums, grads))
    result = (loss, grads[0], grads.get(1))
    return result if log_scale is None else result + (grads[2],)


__all__ = ["BlockExecutor", "DEFAULT_REG", "KIP_LOSSES", "compiled_loss_and_gradients", "kip_loss", "krr_loss",
           "krr_platt_loss", "krr_predict", "loss_and_gradients", "loss_vjp", "random_feature_loss_and_gradients",
           "regularized", "ridge"]
