"""The backend interface: where kernel blocks, block VJPs and Label-Solve partial sums are computed.

A backend computes what the library's algorithms ask of kernels, each a sum or a concatenation over
independent shares of the work, so any split gives the same numbers (up to floating-point summation order):

* :meth:`Backend.forward_blocks` and :meth:`Backend.backward_blocks`: the kernel blocks ``K_ts``, ``K_ss`` of
  a support and a target batch drawn from a resident set, and the support's cotangent through them (the
  block VJPs, summed over the shares): the :class:`kernel_distill.objective.BlockExecutor` protocol, on which
  the KRR objective (:func:`kernel_distill.objective.loss_and_gradients`) takes KIP's gradient;
* :meth:`Backend.normal_equations`: Label Solve's ``K_st K_ts`` and ``K_st y_t`` over a resident set;
* :meth:`Backend.predictions`: KRR predictions on a resident set (evaluation).

A backend knows kernels, not algorithms: nothing here imports KIP or the objective; the objective takes a
backend as its executor (:func:`kernel_distill.objective.backend_loss_and_gradients`).

Data that stays the same for a whole run (the training, validation and test images) is handed over once
with :meth:`Backend.put`; the result is passed to the methods instead of the array. :class:`LocalBackend`
computes in this process (it is the library's default and what every command does without
``--backend``); :class:`kernel_distill.distributed.ray_backend.RayBackend` spreads the shares over Ray actors.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill import kernels
from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import KernelFn

if TYPE_CHECKING:
    from jax.typing import ArrayLike

    from kernel_distill.kernels.api import Get

BACKENDS = ("local", "ray")


def compute_dtype(*arrays: ArrayLike) -> np.dtype:
    """The floating dtype the local process would compute ``arrays`` in: their common type, float32 unless
    JAX's 64-bit mode is on here (the driver's setting, which is then passed to workers explicitly)."""
    dtype = np.result_type(*[np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype for a in arrays])
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float32)
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


class Backend(abc.ABC):
    """Maps the shares of a kernel computation over some workers. Use as a context manager (or ``close``)."""

    name: str = "?"
    num_workers: int = 1
    traceable: bool = False  # block methods are pure JAX functions (the objective on it can be jitted)

    def put(self, array: np.ndarray) -> Any:
        """Hand ``array`` to the workers once; returns what the methods take in its place."""
        return np.asarray(array)

    @abc.abstractmethod
    def forward_blocks(self, kernel_fn: KernelFn, get: Get, x_s: jax.Array, targets: Any,
                       target_idx: jax.Array | np.ndarray | None) -> tuple[jax.Array, jax.Array, Any]:
        """``(K_ts (m, n), K_ss (n, n), residuals)`` for support ``x_s (n, ...)`` and the target batch
        ``targets[target_idx]`` (``targets``: what :meth:`put` returned, or an array); in the dtype of ``x_s``.
        ``residuals`` is what :meth:`backward_blocks` needs, opaque to the caller."""

    @abc.abstractmethod
    def backward_blocks(self, residuals: Any, d_kts: jax.Array, g_ss: jax.Array) -> jax.Array:
        """``dL/dx_s`` through both blocks of the last :meth:`forward_blocks`, summed over the shares:
        ``d_kts (m, n)`` the cotangent of ``K_ts``, ``g_ss (n, n)`` that of ``K_ss`` through its first argument
        (``G + G^T``). The support statistics' VJP included; in the dtype of ``x_s``."""

    @abc.abstractmethod
    def normal_equations(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, x: Any, y: Any,
                         block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(K_st K_ts (n, n), K_st y (n, C), count)``, float64, over the resident ``x`` and labels ``y``."""

    @abc.abstractmethod
    def predictions(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, alpha: np.ndarray, x: Any,
                    block_size: int) -> np.ndarray:
        """``K(x, x_support) @ alpha``, float64 ``(len(x), C)``, over the resident ``x``."""

    def describe(self) -> dict:
        return dict(backend=self.name, workers=self.num_workers)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass(frozen=True)
class LocalBackend(Backend):
    """Everything in this process, one share: what kernel-distill does without ``--backend``.

    Its block methods are pure JAX functions of their arguments (no state: every instance is equal), so
    the objective on this backend runs under ``jax.jit``: KIP's local step is one compiled function.
    """

    name = "local"
    traceable = True

    def forward_blocks(self, kernel_fn: KernelFn, get: Get, x_s: jax.Array, targets: Any,
                       target_idx: jax.Array | np.ndarray | None) -> tuple[jax.Array, jax.Array, tuple]:
        spec, budget = kernel_fn.spec, kernel_fn.tile_budget()
        x_t = targets if target_idx is None else targets[target_idx]
        x_t = jnp.asarray(x_t).astype(x_s.dtype)
        stats_s = kernels.tiled_self_stats(spec, x_s, budget)
        stats_t = kernels.tiled_self_stats(spec, x_t, budget)
        k_ss = kernels.kernel_matrix_from_stats(spec, x_s, stats_s, x_s, stats_s, get, budget)
        k_ts = kernels.kernel_matrix_from_stats(spec, x_t, stats_t, x_s, stats_s, get, budget)
        return k_ts, k_ss, (kernel_fn, get, x_s, stats_s, x_t, stats_t)

    def backward_blocks(self, residuals: tuple, d_kts: jax.Array, g_ss: jax.Array) -> jax.Array:
        kernel_fn, get, x_s, stats_s, x_t, stats_t = residuals
        spec, budget = kernel_fn.spec, kernel_fn.tile_budget()
        dx_ss, dstats_ss, _, _ = kernels.kernel_matrix_vjp(spec, x_s, stats_s, x_s, stats_s, g_ss, get, budget,
                                                           wrt=(True, False))
        _, _, dx_ts, dstats_ts = kernels.kernel_matrix_vjp(spec, x_t, stats_t, x_s, stats_s, d_kts, get, budget,
                                                           wrt=(False, True))
        dstats = jax.tree_util.tree_map(jnp.add, dstats_ss, dstats_ts)
        return dx_ss + dx_ts + kernels.tiled_self_stats_vjp(spec, x_s, dstats, budget)

    def normal_equations(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, x: np.ndarray, y: np.ndarray,
                         block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        from kernel_distill.distributed.shares import normal_equation_share

        starts = range(0, len(x), min(block_size, max(1, len(x))))
        return normal_equation_share(kernel_fn, get, x_support, x, y, starts, block_size)

    def predictions(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, alpha: np.ndarray, x: np.ndarray,
                    block_size: int) -> np.ndarray:
        from kernel_distill.distributed.shares import prediction_share

        starts = range(0, len(x), min(block_size, max(1, len(x))))
        return prediction_share(kernel_fn, get, x_support, alpha, x, starts, block_size)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """How to compute: ``backend`` ``"local"`` or ``"ray"``; for Ray, ``workers`` actors (``None``: one per
    GPU of the cluster, else one per CPU), ``address`` of an existing cluster (``"auto"``, ``"host:port"``) or
    ``None`` to start a local one for the command, and ``retries``: restarts of a failed worker (and retries
    of its tasks) before the run stops with an error. An ``address`` is checked here, by connecting to it:
    where no Ray cluster answers, this raises
    :class:`~kernel_distill.distributed.cluster.ClusterUnreachable` at once."""

    backend: str = "local"
    workers: int | None = None
    address: str | None = None
    retries: int = 3

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise KernelDistillError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise KernelDistillError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.retries < 0:
            raise KernelDistillError(f"retries must be non-negative, got {self.retries}")
        if self.backend == "local" and (self.workers not in (None, 1) or self.address is not None):
            raise KernelDistillError("--workers and --ray-address need --backend ray")
        if self.backend == "ray" and self.address is not None:
            # before any data is loaded: an address where no Ray cluster answers fails in seconds, naming it
            # (ray.init would retry it for many minutes); RayBackend.start checks it again when it connects
            from kernel_distill.distributed.cluster import check_address

            check_address(self.address)
