"""The Ray backend: the shares of every kernel computation run on a pool of Ray actors.

Each actor (:class:`KernelWorker`) is a separate Python process that Ray starts itself (a fresh
interpreter, never a fork of the driver, so JAX in it is sound), with its own device: ``num_gpus`` per actor
when the cluster has GPUs. What crosses the network:

* once per run: the resident arrays (training images, validation/test images) through Ray's object store,
  :meth:`RayBackend.put`; an actor keeps what it has read, and a restarted actor reads it again;
* per KIP step, driver to workers: the support images (one object shared by every actor on a node), each
  worker's target indices (int64) and, backward, its rows of ``dL/dK_ts`` and of ``G + G^T``;
  workers to driver: the kernel blocks forward, and the support's cotangents (images and statistics) back.

The backend is a :class:`kernel_distill.objective.BlockExecutor` (:class:`ShareBlocks`): the driver samples
the target batch (the same key chain as the local step), the objective computes the KRR loss's VJP there
and KIP the optimiser update; workers compute only kernel blocks and block VJPs, in the dtype the driver names in
every call (no process-wide precision switch a worker could miss). A worker that dies is restarted by Ray
and its unfinished calls are run again (``retries`` times); the calls are pure functions of their arguments,
so the run's numbers do not change. When the retries are spent, the run stops with
:class:`WorkerFailed`, naming the worker.

Where Ray fails rather than a worker, a command gets one line too. Without an address the backend starts a
Ray of its own on loopback, in a fresh interpreter (:class:`~kernel_distill.distributed.cluster.LocalRayHead`):
starting Ray forks the process that starts it, which must not be one running JAX. An address is checked
before ``ray.init`` (where nothing answers, :class:`ClusterUnreachable` in seconds). While a run waits for its
workers the backend checks that the cluster's GCS server and this node's raylet still answer: when either is
gone the run stops with :class:`ClusterStopped`, one line, and Ray's own log lines stay off the terminal.
Commands run this class in a driver process of their own (:mod:`kernel_distill.distributed.driver`), since
Ray's C++ code ends a driver process outright when its raylet dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.distributed import cluster, shares
from kernel_distill.distributed.backend import Backend
from kernel_distill.distributed.cluster import LOOPBACK_ENVIRONMENT, ClusterStopped, ClusterUnreachable  # noqa: F401
from kernel_distill.errors import KernelDistillError

if TYPE_CHECKING:
    from types import ModuleType

    from kernel_distill.kernels import KernelFn
    from kernel_distill.kernels.api import Get

RESIDENT_CACHE = 8  # arrays an actor keeps (train, validation, test, labels: a few per run)
WAIT_S = 1.0  # while waiting for workers, check the cluster this often


class WorkerFailed(KernelDistillError):
    """A Ray worker failed for good (its restarts are spent)."""


def import_ray(local: bool) -> ModuleType:
    """``import ray``; for a ``local`` instance first the loopback settings (unless the user set them)."""
    return cluster.import_ray(local)


@functools.cache
def worker_class() -> Any:
    """The Ray actor class of :class:`KernelWorker` (made on first use, so importing this module needs no Ray)."""
    import ray

    return ray.remote(KernelWorker)


class KernelWorker:
    """One worker process: resident arrays, and the share functions of :mod:`kernel_distill.distributed.shares`."""

    def __init__(self, index: int):
        self.index = index
        self.resident: dict[str, np.ndarray] = {}

    def info(self) -> dict:
        import ray

        return dict(index=self.index, pid=os.getpid(), node=ray.get_runtime_context().get_node_id(),
                    devices=[str(d) for d in jax.devices()])

    def _array(self, handle) -> np.ndarray:
        import ray

        ref = handle[0]
        key = ref.hex()
        if key not in self.resident:
            if len(self.resident) >= RESIDENT_CACHE:
                self.resident.pop(next(iter(self.resident)))
            self.resident[key] = ray.get(ref)
        return self.resident[key]

    def forward_share(self, kernel_fn: KernelFn, get: Get, dtype: str, rows: tuple[int, int], train: list,
                      idx: np.ndarray, x_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        started = time.perf_counter()
        with jax.enable_x64(dtype == "float64"):
            x_t = shares.as_dtype(self._array(train)[idx], dtype)
            k_ts, k_rs = shares.forward_share(kernel_fn, get, tuple(rows), x_t, shares.as_dtype(x_s, dtype))
            k_ts, k_rs = np.asarray(k_ts), np.asarray(k_rs)
        return k_ts, k_rs, time.perf_counter() - started

    def backward_share(self, kernel_fn: KernelFn, get: Get, dtype: str, rows: tuple[int, int], train: list,
                       idx: np.ndarray, x_s: np.ndarray, d_kts: np.ndarray,
                       g_rows: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...], float]:
        started = time.perf_counter()
        with jax.enable_x64(dtype == "float64"):
            x_t = shares.as_dtype(self._array(train)[idx], dtype)
            dx, dstats = shares.backward_share(kernel_fn, get, tuple(rows), x_t, shares.as_dtype(x_s, dtype),
                                               shares.as_dtype(d_kts, dtype), shares.as_dtype(g_rows, dtype))
            dx, dstats = np.asarray(dx), tuple(np.asarray(s) for s in dstats)
        return dx, dstats, time.perf_counter() - started

    def normal_equations(self, kernel_fn: KernelFn, get: Get, dtype: str, x_support: np.ndarray, x: list, y: list,
                         starts: Iterable[int], block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        with jax.enable_x64(dtype == "float64"):
            return shares.normal_equation_share(kernel_fn, get, shares.as_dtype(x_support, dtype),
                                                _Cast(self._array(x), dtype), self._array(y), starts, block_size)

    def predictions(self, kernel_fn: KernelFn, get: Get, dtype: str, x_support: np.ndarray, alpha: np.ndarray,
                    x: list, starts: Iterable[int], block_size: int) -> np.ndarray:
        with jax.enable_x64(dtype == "float64"):
            return shares.prediction_share(kernel_fn, get, shares.as_dtype(x_support, dtype), alpha,
                                           _Cast(self._array(x), dtype), starts, block_size)


class _Cast:
    """Rows of an array, cast to ``dtype`` when sliced (so a float32 resident set serves a float64 run)."""

    def __init__(self, array, dtype):
        self.array, self.dtype = array, dtype

    def __len__(self):
        return len(self.array)

    def __getitem__(self, item):
        return np.asarray(self.array[item], self.dtype)


def _at_boundary(method):
    """``method`` under :meth:`RayBackend._cluster_errors`: a stopped cluster is one line, not Ray's."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._cluster_errors():
            return method(self, *args, **kwargs)

    return wrapper


@dataclasses.dataclass(frozen=True)
class PendingBlocks:
    """What :meth:`ShareBlocks.backward_blocks` needs of its forward pass: the kernel, the support (host
    array, for its statistics' VJP here) and the forward's timing record."""

    kernel_fn: object
    support: np.ndarray
    started: float  # time.perf_counter() when the forward pass began
    returned: float  # ... and when the workers' blocks had arrived
    forward: dict


class ShareBlocks:
    """The :class:`kernel_distill.objective.BlockExecutor` methods of a Ray backend, on top of its
    ``forward_shares``/``backward_shares`` (this process's Ray, or a driver process's): the blocks and block
    VJPs from the workers, the support statistics' VJP (added once, after the workers' sum) here.

    Records each pass in ``last_step``: seconds of the whole, ``driver_seconds`` spent here between the
    workers' two passes and after them (the objective's VJP, the statistics' VJP), ``forward_seconds``,
    ``backward_seconds`` (the slowest worker's), bytes both ways, ``workers_used``.
    """

    last_step: dict
    forward_shares: Callable[..., tuple[np.ndarray, np.ndarray, dict]]  # the concrete backend's
    backward_shares: Callable[[np.ndarray, np.ndarray], Any]  # the concrete backend's

    def forward_blocks(self, kernel_fn: KernelFn, get: Get, x_s: jax.Array, targets: Any,
                       target_idx: jax.Array | np.ndarray | None) -> tuple[jax.Array, jax.Array, PendingBlocks]:
        if target_idx is None:  # the workers read the targets from the object store, by row
            raise KernelDistillError("a Ray backend takes the target batch as row indices into a set handed over "
                                     "with put, not None")
        started = time.perf_counter()
        support = np.asarray(x_s)
        idx = np.asarray(target_idx, np.int64)
        k_ts, k_ss, forward = self.forward_shares(kernel_fn, get, np.dtype(support.dtype).name, support, targets,
                                                  idx)
        pending = PendingBlocks(kernel_fn, support, started, time.perf_counter(), forward)
        return jnp.asarray(k_ts), jnp.asarray(k_ss), pending

    def backward_blocks(self, pending: PendingBlocks, d_kts: jax.Array, g_ss: jax.Array) -> jax.Array:
        driver_seconds = time.perf_counter() - pending.returned  # the objective's VJP, between the two passes
        dx, dstats, backward = self.backward_shares(np.asarray(d_kts), np.asarray(g_ss))
        driver_started = time.perf_counter()
        dx = jnp.asarray(dx) + shares.support_stats_vjp(pending.kernel_fn, jnp.asarray(pending.support),
                                                        tuple(jnp.asarray(s) for s in dstats))
        dx.block_until_ready()
        driver_seconds += time.perf_counter() - driver_started
        forward = pending.forward
        self.last_step = dict(seconds=time.perf_counter() - pending.started, driver_seconds=driver_seconds,
                              forward_seconds=forward["seconds"], backward_seconds=backward["seconds"],
                              bytes_sent=int(forward["bytes_sent"] + backward["bytes_sent"]),
                              bytes_received=int(forward["bytes_received"] + backward["bytes_received"]),
                              workers_used=forward["workers_used"])
        return dx


class RayBackend(ShareBlocks, Backend):
    """Shares of the work on ``len(actors)`` Ray actors. Build with :meth:`start`; ``close`` ends the actors
    (and the Ray instance, if :meth:`start` started it)."""

    name = "ray"

    def __init__(self, actors, retries: int, owns_ray: bool, log=print, head: cluster.LocalRayHead | None = None,
                 watch: cluster.ClusterWatch | None = None):
        self.actors = list(actors)
        self.num_workers = len(self.actors)
        self.retries = retries
        self.owns_ray = owns_ray
        self.log = log
        self.head = head
        self.watch = watch
        self._resident: dict[tuple, tuple] = {}
        self.workers = self.worker_info()
        self.last_step: dict = {}

    @classmethod
    def start(cls, workers: int | None = None, address: str | None = None, retries: int = 3,
              log: Callable[[str], None] = print, gcs_grace_s: float | None = None) -> RayBackend:
        """Connect this process to Ray (``address``: ``"auto"``, ``"host:port"``; ``None`` starts a local
        instance on loopback for this backend, :class:`~kernel_distill.distributed.cluster.LocalRayHead`)
        and start ``workers`` actors, each with one GPU share when the cluster has GPUs. If Ray is already
        initialised in this process, its cluster is used and ``address`` ignored. An address where no Ray
        cluster answers fails at once with :class:`ClusterUnreachable`. ``gcs_grace_s``: seconds a silent
        GCS is waited for before the run stops (default: 0 for a Ray this backend started, else
        :data:`~kernel_distill.distributed.cluster.GCS_GRACE_S`).

        Commands do not call this in their own process: :func:`~kernel_distill.distributed.open_backend`
        runs it in a driver process of its own (:class:`~kernel_distill.distributed.driver.RayDriverBackend`),
        since Ray ends a driver process outright (``_Exit(1)``, no exception) when its node's raylet dies
        under one of its object-store calls."""
        on_loopback = address is None or (address != "auto" and cluster.is_loopback(cluster.parse_address(address)[0]))
        ray = import_ray(local=on_loopback)
        owns_ray, head = False, None
        if not ray.is_initialized():
            if address is None:
                head = cluster.LocalRayHead(workers or os.cpu_count() or 1)
                target = head.address
            else:
                target = cluster.check_address(address)
                if cluster.is_loopback(cluster.parse_address(target)[0]):
                    import_ray(local=True)  # "auto" found a cluster on loopback: stay there
            try:
                _connect(ray, target)
            except BaseException:
                if head is not None:
                    head.close()
                raise
            owns_ray = True
        watch = None
        try:
            if gcs_grace_s is None:
                gcs_grace_s = 0.0 if head is not None else cluster.GCS_GRACE_S
            watch = _watch(ray, grace_s=gcs_grace_s)
            resources = ray.cluster_resources()
            gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
            if workers is None:
                workers = int(gpus) if gpus >= 1 else max(1, int(cpus))
            options = dict(max_restarts=retries, max_task_retries=retries)
            if gpus:
                options.update(num_gpus=min(1.0, gpus / workers), num_cpus=0)
            else:
                if cpus < workers:
                    raise KernelDistillError(f"--workers {workers} needs {workers} CPUs; the Ray cluster has "
                                             f"{cpus:g}")
                options.update(num_cpus=1)
            actors = [worker_class().options(**options).remote(i) for i in range(workers)]
            backend = cls(actors, retries, owns_ray, log, head=head, watch=watch)
        except BaseException as e:
            if owns_ray:
                _disconnect(ray)
            if head is not None:
                head.close()
            if isinstance(e, Exception) and not isinstance(e, KernelDistillError):
                _raise_if_cluster_failed(e, watch)
            raise
        return backend

    # -- plumbing ------------------------------------------------------------------------------------

    def worker_info(self) -> list[dict]:
        """``index``, ``pid``, ``node`` and ``devices`` of every worker (now: a restarted one has a new pid)."""
        return self._gather([a.info.remote() for a in self.actors], "its start")

    def describe(self) -> dict:
        return dict(backend=self.name, workers=self.num_workers, retries=self.retries,
                    devices=sorted({d for w in self.workers for d in w["devices"]}))

    def check_cluster(self) -> None:
        """Raise :class:`ClusterStopped` if the cluster's GCS server or this node's raylet is gone."""
        if self.watch is not None:
            self.watch.check()

    def put(self, array: np.ndarray) -> Any:
        """Put ``array`` in Ray's object store once; the same array (same memory, shape, dtype) again returns
        the same handle, so a run's evaluation sets are sent once, not at every evaluation."""
        import ray

        array = np.asarray(array)
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        if key not in self._resident:
            with self._cluster_errors():
                # a list, so Ray passes the reference itself (not its value) and the actor can keep what it read
                self._resident[key] = (array, [ray.put(array), array.shape])  # holding the array: no reused memory
        return self._resident[key][1]

    @contextlib.contextmanager
    def _cluster_errors(self):
        """Check the cluster first; a failure of Ray itself inside becomes :class:`ClusterStopped` (one line)
        when the cluster is gone, or is a system error of Ray's (errors of the computation pass through)."""
        self.check_cluster()
        try:
            yield
        except KernelDistillError:
            raise
        except Exception as e:
            _raise_if_cluster_failed(e, self.watch)
            raise

    def _gather(self, futures, what: str, workers=None):
        import ray
        import ray.exceptions

        workers = range(len(futures)) if workers is None else workers
        with self._cluster_errors():
            pending = list(futures)
            while pending:  # waiting in short rounds, so a stopped cluster is noticed (and Ctrl-C at once)
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
                if pending:
                    self.check_cluster()
        results = []
        for w, future in zip(workers, futures):
            try:
                with self._cluster_errors():
                    results.append(ray.get(future))
            except ray.exceptions.RayActorError as e:
                self.check_cluster()  # a worker killed with its node is the cluster's failure, not the worker's
                known = getattr(self, "workers", None)
                pid = f", pid {known[w]['pid']} at start" if known else ""
                raise WorkerFailed(
                    f"Ray worker {w}{pid} failed for good while computing {what}, after {self.retries} "
                    f"restart(s): {_first_line(e)}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if isinstance(cause, KernelDistillError):
                    raise type(cause)(str(cause)) from None
                raise KernelDistillError(f"Ray worker {w} raised {type(cause).__name__} while computing {what}: "
                                         f"{cause}") from None
        return results

    def close(self) -> None:
        """End the actors; disconnect from (and stop) the Ray instance :meth:`start` connected to (started)."""
        import ray

        stopped = self.watch is not None and self.watch.stopped is not None
        for actor in [] if stopped else self.actors:  # a stopped cluster cannot end them (they ended with it)
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        self._resident.clear()
        if stopped and self.head is not None:  # end what is left of it first: then disconnecting is quick
            self.head.close(cluster_stopped=True)
            self.head = None
        if self.owns_ray:
            _disconnect(ray)
            self.owns_ray = False
        if self.head is not None:
            self.head.close()
            self.head = None

    # -- the work ------------------------------------------------------------------------------------

    @_at_boundary
    def forward_shares(self, kernel_fn: KernelFn, get: Get, dtype: str, support: np.ndarray, train: list,
                       idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """The kernel blocks ``(K_ts, K_ss, record)`` of a support and the target rows ``idx`` of the resident
        ``train``, the work split over the workers; the split is kept for :meth:`backward_shares`, the
        second half."""
        import ray

        support_ref = ray.put(support)
        targets = shares.split_evenly(len(idx), self.num_workers)
        rows = shares.split_evenly(len(support), self.num_workers)
        busy = [w for w in range(self.num_workers) if targets[w][1] > targets[w][0] or rows[w][1] > rows[w][0]]
        futures = [self.actors[w].forward_share.remote(kernel_fn, get, dtype, rows[w], train,
                                                       idx[targets[w][0]:targets[w][1]], support_ref) for w in busy]
        forward = self._gather(futures, "its kernel blocks", busy)
        k_ts = np.concatenate([f[0] for f in forward])
        k_ss = np.concatenate([f[1] for f in forward])
        self._pending_shares: tuple | None = (kernel_fn, get, dtype, train, idx, support_ref, targets, rows, busy)
        return k_ts, k_ss, dict(seconds=max(f[2] for f in forward), workers_used=len(busy),
                                bytes_sent=support.nbytes + idx.nbytes, bytes_received=k_ts.nbytes + k_ss.nbytes)

    @_at_boundary
    def backward_shares(self, d_kts: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...], dict]:
        """The block VJPs of the last :meth:`forward_shares` summed over the workers, ``(dx, dstats, record)``:
        ``d_kts`` the cotangent of ``K_ts``, ``g`` that of ``K_ss`` plus its transpose."""
        if self._pending_shares is None:
            raise KernelDistillError("backward_shares needs a forward_shares before it")
        kernel_fn, get, dtype, train, idx, support_ref, targets, rows, busy = self._pending_shares
        self._pending_shares = None
        futures = [self.actors[w].backward_share.remote(
            kernel_fn, get, dtype, rows[w], train, idx[targets[w][0]:targets[w][1]], support_ref,
            d_kts[targets[w][0]:targets[w][1]], g[rows[w][0]:rows[w][1]]) for w in busy]
        backward = self._gather(futures, "its block VJPs", busy)
        dx = backward[0][0]
        dstats = backward[0][1]
        for b in backward[1:]:
            dx = dx + b[0]
            dstats = tuple(a + c for a, c in zip(dstats, b[1]))
        received = sum(b[0].nbytes + sum(s.nbytes for s in b[1]) for b in backward)
        return dx, dstats, dict(seconds=max(b[2] for b in backward), bytes_sent=d_kts.nbytes + g.nbytes,
                                bytes_received=received)

    def _block_starts(self, n: int, block_size: int):
        block_size = min(block_size, max(1, n))
        starts = list(range(0, n, block_size))
        # round robin: neighbouring blocks go to different workers, so shares stay within one block's work
        return [starts[w::self.num_workers] for w in range(self.num_workers)], block_size

    def _map_blocks(self, method: str, what: str, kernel_fn, get, x_support, middle: tuple, n_rows: int,
                    block_size: int):
        """Call each busy worker's ``method(kernel_fn, get, dtype, support, *middle, starts, block_size)`` on
        its round-robin share of the ``n_rows`` rows in blocks. Returns ``(busy, starts per worker,
        block_size, results of the busy workers)``; a failure names the worker and ``what`` it computed."""
        import ray

        assigned, block_size = self._block_starts(n_rows, block_size)
        support = np.asarray(x_support)
        support_ref = ray.put(support)
        busy = [w for w in range(self.num_workers) if assigned[w]]
        futures = [getattr(self.actors[w], method).remote(kernel_fn, get, shares_dtype(support), support_ref, *middle,
                                                          assigned[w], block_size) for w in busy]
        return busy, assigned, block_size, self._gather(futures, what, busy)

    @_at_boundary
    def normal_equations(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, x: list, y: list,
                         block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        *_, parts = self._map_blocks("normal_equations", "its Label-Solve partial sums", kernel_fn, get, x_support,
                                     (x, y), _length(x), block_size)
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    @_at_boundary
    def predictions(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, alpha: np.ndarray, x: list,
                    block_size: int) -> np.ndarray:
        n_rows = _length(x)
        alpha = np.asarray(alpha, np.float64)
        busy, assigned, block_size, parts = self._map_blocks("predictions", "its KRR predictions", kernel_fn, get,
                                                             x_support, (alpha, x), n_rows, block_size)
        out = np.zeros((n_rows, alpha.shape[1]))
        for w, part in zip(busy, parts):
            offset = 0
            for start in assigned[w]:
                rows = min(block_size, n_rows - start)
                out[start:start + rows] = part[offset:offset + rows]
                offset += rows
        return out


def _connect(ray, address: str) -> None:
    """``ray.init`` to the cluster at ``address`` (checked to answer), with Ray's own logging quiet: no worker
    output or Ray log lines on this process's terminal, so a failure is the one line the backend raises."""
    for name in cluster.DRIVER_ONLY_ENVIRONMENT:  # read when this process's Ray connects
        os.environ.setdefault(name, str(cluster.DRIVER_GCS_RECONNECT_TIMEOUT_S))
    try:
        ray.init(address=address, configure_logging=True, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {_first_line(e)}") from None
    _quiet_error_messages(True)


def _disconnect(ray) -> None:
    if ray.is_initialized():
        ray.shutdown()
    _quiet_error_messages(False)  # after: Ray's thread prints until the shutdown stops it


def _quiet_error_messages(quiet: bool) -> None:
    """Ray prints the cluster's error messages (a dead raylet's last 20 log lines, a dead worker's ...) on
    the driver's stdout from a thread of its own, with no option of ``ray.init`` to stop it; this is the
    switch Ray's own debugger (``ray.util.rpdb``) turns off while it runs. The backend reports those
    failures itself, as one line."""
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "_worker_logs_enabled"):
        ray_worker._worker_logs_enabled = not quiet


def _watch(ray, grace_s: float) -> cluster.ClusterWatch:
    """A :class:`~kernel_distill.distributed.cluster.ClusterWatch` of the connected cluster's GCS and of this
    node's raylet (each left out when this Ray does not say where it is: Ray Client, another version)."""
    try:
        gcs = ray.get_runtime_context().gcs_address
        cluster.parse_address(gcs)
    except Exception:
        gcs = None
    try:  # Ray's own record of the node this process is connected to
        node = ray._private.worker.global_worker.node
        host, port = node.node_ip_address, node.node_manager_port
    except Exception:
        host, port = None, None
    raylet = f"{host}:{port}" if host and isinstance(port, int) and port > 0 else None
    if raylet and ":" in host:
        raylet = f"[{host}]:{port}"
    return cluster.ClusterWatch(gcs, raylet, grace_s)


def _raise_if_cluster_failed(error: Exception, watch: cluster.ClusterWatch | None) -> None:
    """Raise :class:`ClusterStopped` for ``error`` if the cluster is gone or ``error`` is a system error of
    Ray's (not of the computation); otherwise return, and the caller re-raises ``error``."""
    import ray.exceptions

    if not isinstance(error, (ray.exceptions.RayError, ConnectionError)):
        return
    if watch is not None:
        watch.check()
    if isinstance(error, (ray.exceptions.RaySystemError, ConnectionError)):
        raise ClusterStopped(f"the Ray cluster stopped: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def shares_dtype(x: np.ndarray | jax.Array) -> str:
    """The name of the dtype workers compute ``x`` in: its own (float64 only in a float64 run)."""
    dtype = np.dtype(x.dtype)
    return dtype.name if np.issubdtype(dtype, np.floating) else "float32"


def _length(handle) -> int:
    return int(handle[1][0])
