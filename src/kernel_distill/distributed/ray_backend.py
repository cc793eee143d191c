"""The Ray backend: the shares of every kernel computation run on a pool of Ray actors.

Each actor (:class:`KernelWorker`) is a separate Python process that Ray starts itself (a fresh
interpreter, never a fork of the driver, so JAX in it is sound), with its own device: ``num_gpus`` per actor
when the cluster has GPUs. What crosses the network:

* once per run: the resident arrays (training images, validation/test images) through Ray's object store,
  :meth:`RayBackend.put`; an actor keeps what it has read, and a restarted actor reads it again;
* per KIP step, driver to workers: the support images (one object shared by every actor on a node), each
  worker's target indices (int64) and, backward, its rows of ``dL/dK_ts`` and of ``G + G^T``;
  workers to driver: the kernel blocks forward, and the support's cotangents (images and statistics) back.

The driver samples the target batch (the same key chain as the local step), computes the KRR loss's VJP and
the optimiser update; workers compute only kernel blocks and block VJPs, in the dtype the driver names in
every call (no process-wide precision switch a worker could miss). A worker that dies is restarted by Ray
and its unfinished calls are run again (``retries`` times); the calls are pure functions of their arguments,
so the run's numbers do not change. When the retries are spent, the run stops with
:class:`WorkerFailed`, naming the worker.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.distributed import shares
from kernel_distill.distributed.backend import Backend, krr_loss_vjp
from kernel_distill.errors import KernelDistillError

# A Ray started by this module listens on loopback only, without dashboard or token file. Ray reads these
# when it is imported (and its processes inherit them), so they are set before the first ``import ray``.
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
RESIDENT_CACHE = 8  # arrays an actor keeps (train, validation, test, labels: a few per run)


class WorkerFailed(KernelDistillError):
    """A Ray worker failed for good (its restarts are spent)."""


def import_ray(local: bool):
    """``import ray``; for a ``local`` instance first the loopback settings (unless the user set them)."""
    if local:
        for name, value in LOOPBACK_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        already = "ray" in sys.modules
    try:
        import ray
    except ImportError:
        raise KernelDistillError("--backend ray needs Ray: pip install 'kernel-distill[ray]'") from None
    if local and already and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # imported before the setting was in place: Ray decided its node address at import
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False
    return ray


@functools.cache
def worker_class():
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

    def kip_forward(self, kernel_fn, get, dtype, rows, train, idx, x_s):
        started = time.perf_counter()
        with jax.enable_x64(dtype == "float64"):
            x_t = shares.as_dtype(self._array(train)[idx], dtype)
            k_ts, k_rs = shares.kip_forward_share(kernel_fn, get, tuple(rows), x_t, shares.as_dtype(x_s, dtype))
            k_ts, k_rs = np.asarray(k_ts), np.asarray(k_rs)
        return k_ts, k_rs, time.perf_counter() - started

    def kip_backward(self, kernel_fn, get, dtype, rows, train, idx, x_s, d_kts, g_rows):
        started = time.perf_counter()
        with jax.enable_x64(dtype == "float64"):
            x_t = shares.as_dtype(self._array(train)[idx], dtype)
            dx, dstats = shares.kip_backward_share(kernel_fn, get, tuple(rows), x_t, shares.as_dtype(x_s, dtype),
                                                   shares.as_dtype(d_kts, dtype), shares.as_dtype(g_rows, dtype))
            dx, dstats = np.asarray(dx), tuple(np.asarray(s) for s in dstats)
        return dx, dstats, time.perf_counter() - started

    def normal_equations(self, kernel_fn, get, dtype, x_support, x, y, starts, block_size):
        with jax.enable_x64(dtype == "float64"):
            return shares.normal_equation_share(kernel_fn, get, shares.as_dtype(x_support, dtype),
                                                _Cast(self._array(x), dtype), self._array(y), starts, block_size)

    def predictions(self, kernel_fn, get, dtype, x_support, alpha, x, starts, block_size):
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


class RayBackend(Backend):
    """Shares of the work on ``len(actors)`` Ray actors. Build with :meth:`start`; ``close`` ends the actors
    (and the Ray instance, if :meth:`start` started it)."""

    name = "ray"

    def __init__(self, actors, retries: int, owns_ray: bool, log=print):
        self.actors = list(actors)
        self.num_workers = len(self.actors)
        self.retries = retries
        self.owns_ray = owns_ray
        self.log = log
        self._resident: dict[tuple, tuple] = {}
        self.workers = self.worker_info()
        self.last_step: dict = {}

    @classmethod
    def start(cls, workers: int | None = None, address: str | None = None, retries: int = 3, log=print):
        """Connect to Ray (``address``: ``"auto"``, ``"host:port"``; ``None`` starts a local instance on
        loopback for this backend) and start ``workers`` actors, each with one GPU share when the cluster
        has GPUs."""
        ray = import_ray(local=address is None)
        owns_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=True)
            else:
                try:
                    ray.init(address=address, include_dashboard=False, configure_logging=False)
                except (ConnectionError, ValueError, RuntimeError) as e:
                    raise KernelDistillError(f"cannot connect to the Ray cluster at {address}: {e}") from None
            owns_ray = True
        try:
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
            backend = cls(actors, retries, owns_ray, log)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        return backend

    # -- plumbing ------------------------------------------------------------------------------------

    def worker_info(self) -> list[dict]:
        """``index``, ``pid``, ``node`` and ``devices`` of every worker (now: a restarted one has a new pid)."""
        return self._gather([a.info.remote() for a in self.actors], "its start")

    def describe(self) -> dict:
        return dict(backend=self.name, workers=self.num_workers, retries=self.retries,
                    devices=sorted({d for w in self.workers for d in w["devices"]}))

    def put(self, array):
        import ray

        """Put ``array`` in Ray's object store once; the same array (same memory, shape, dtype) again returns
        the same handle, so a run's evaluation sets are sent once, not at every evaluation."""
        array = np.asarray(array)
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        if key not in self._resident:
            # a list, so Ray passes the reference itself (not its value) and the actor can keep what it read
            self._resident[key] = (array, [ray.put(array), array.shape])  # holding the array: no reused memory
        return self._resident[key][1]

    def _gather(self, futures, what: str, workers=None):
        import ray
        import ray.exceptions

        workers = range(len(futures)) if workers is None else workers
        results = []
        for w, future in zip(workers, futures):
            try:
                results.append(ray.get(future))
            except ray.exceptions.RayActorError as e:
                known = getattr(self, "workers", None)
                pid = f", pid {known[w]['pid']} at start" if known else ""
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WorkerFailed(
                    f"Ray worker {w}{pid} failed for good while computing {what}, after {self.retries} "
                    f"restart(s): {reason}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if isinstance(cause, KernelDistillError):
                    raise type(cause)(str(cause)) from None
                raise KernelDistillError(f"Ray worker {w} raised {type(cause).__name__} while computing {what}: "
                                         f"{cause}") from None
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        self._resident.clear()
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    # -- the work ------------------------------------------------------------------------------------

    def kip_loss_and_gradients(self, kernel_fn, get, reg, x_s, y_s, train, target_idx, y_t):
        import ray

        started = time.perf_counter()
        dtype = np.dtype(x_s.dtype).name
        support = np.asarray(x_s)
        support_ref = ray.put(support)
        idx = np.asarray(target_idx, np.int64)
        targets = shares.split_evenly(len(idx), self.num_workers)
        rows = shares.split_evenly(len(support), self.num_workers)
        busy = [w for w in range(self.num_workers) if targets[w][1] > targets[w][0] or rows[w][1] > rows[w][0]]
        sent = support.nbytes + idx.nbytes

        futures = [self.actors[w].kip_forward.remote(kernel_fn, get, dtype, rows[w], train,
                                                     idx[targets[w][0]:targets[w][1]], support_ref) for w in busy]
        forward = self._gather(futures, "its KIP kernel blocks", busy)
        k_ts = np.concatenate([f[0] for f in forward])
        k_ss = np.concatenate([f[1] for f in forward])
        received = k_ts.nbytes + k_ss.nbytes

        driver_started = time.perf_counter()
        loss, d_kss, d_kts, d_ys = krr_loss_vjp(jnp.asarray(k_ss), jnp.asarray(k_ts), jnp.asarray(y_s),
                                                jnp.asarray(y_t), reg)
        g = np.asarray(d_kss + d_kss.T)
        d_kts = np.asarray(d_kts)
        driver_seconds = time.perf_counter() - driver_started
        sent += d_kts.nbytes + g.nbytes

        futures = [self.actors[w].kip_backward.remote(
            kernel_fn, get, dtype, rows[w], train, idx[targets[w][0]:targets[w][1]], support_ref,
            d_kts[targets[w][0]:targets[w][1]], g[rows[w][0]:rows[w][1]]) for w in busy]
        backward = self._gather(futures, "its KIP block VJPs", busy)
        dx = backward[0][0]
        dstats = backward[0][1]
        for b in backward[1:]:
            dx = dx + b[0]
            dstats = tuple(a + c for a, c in zip(dstats, b[1]))
        received += sum(b[0].nbytes + sum(s.nbytes for s in b[1]) for b in backward)

        driver_started = time.perf_counter()
        dx = jnp.asarray(dx) + shares.support_stats_vjp(kernel_fn, jnp.asarray(support),
                                                        tuple(jnp.asarray(s) for s in dstats))
        dx.block_until_ready()
        driver_seconds += time.perf_counter() - driver_started
        self.last_step = dict(seconds=time.perf_counter() - started, driver_seconds=driver_seconds,
                              forward_seconds=max(f[2] for f in forward),
                              backward_seconds=max(b[2] for b in backward), bytes_sent=int(sent),
                              bytes_received=int(received), workers_used=len(busy))
        return loss, dx, d_ys

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

    def normal_equations(self, kernel_fn, get, x_support, x, y, block_size):
        *_, parts = self._map_blocks("normal_equations", "its Label-Solve partial sums", kernel_fn, get, x_support,
                                     (x, y), _length(x), block_size)
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def predictions(self, kernel_fn, get, x_support, alpha, x, block_size):
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


def shares_dtype(x) -> str:
    """The name of the dtype workers compute ``x`` in: its own (float64 only in a float64 run)."""
    dtype = np.dtype(x.dtype)
    return dtype.name if np.issubdtype(dtype, np.floating) else "float32"


def _length(handle) -> int:
    return int(handle[1][0])
