"""The Ray driver in a process of its own, so that a failing cluster ends a command with one line.

Ray's driver code, running in a process, ends that process outright when the raylet of its node dies under
one of its object-store calls (a C++ ``_Exit(1)`` from a Ray thread: no exception, no message on the
terminal, exit code 1), and it prints C++ log lines on that process's stderr while the cluster fails. So a
command does not talk to Ray itself: :class:`RayDriverBackend` starts :func:`serve` in a fresh interpreter
(spawned with no Python code run between fork and exec, since the command's process runs JAX), and sends it
each call over a socket pair. The driver process runs the in-process
:class:`~kernel_distill.distributed.ray_backend.RayBackend`; the command's process keeps the JAX parts of a
KIP step (the objective's VJP, and the support statistics' VJP of
:class:`~kernel_distill.distributed.ray_backend.ShareBlocks`). When the driver process ends
unexpectedly, the command checks the cluster and raises
:class:`~kernel_distill.distributed.cluster.ClusterStopped`, one line; the driver process's own output
(Ray's log lines) goes to a temporary file, whose last line a failure quotes.

What this costs: every call's arguments and results are pickled once more, over a local socket (a KIP step
of CIFAR-10 at 10 images per class moves about 10 MB: milliseconds); the resident arrays cross once, as raw
bytes.
"""

from __future__ import annotations

import importlib.util
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kernel_distill.distributed import cluster
from kernel_distill.distributed.backend import Backend
from kernel_distill.distributed.cluster import ClusterStopped
from kernel_distill.distributed.ray_backend import ShareBlocks
from kernel_distill.errors import KernelDistillError

if TYPE_CHECKING:
    from kernel_distill.kernels import KernelFn
    from kernel_distill.kernels.api import Get

# the driver process's entry point; -P: neither the working directory nor a script's folder on sys.path
_SERVE = "import sys; from kernel_distill.distributed.driver import serve; sys.exit(serve(int(sys.argv[1])))"
CALLS = ("forward_shares", "backward_shares", "normal_equations", "predictions", "worker_info", "check_cluster")


class Resident:
    """The command's handle of an array the driver process holds in Ray's object store (``put``)."""

    def __init__(self, key: int, shape: tuple):
        self.key, self.shape = key, tuple(shape)


class _Ended(Exception):
    """The driver process is gone (its end of the socket closed)."""


class DriverProcess:
    """:func:`serve` in a fresh interpreter, in a session of its own (a Ctrl-C is the command's, which then
    closes it), and the command's end of its socket."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        self._log = tempfile.TemporaryFile()  # the driver's stdout and stderr: Ray's log lines, a traceback
        try:
            self.process = subprocess.Popen([sys.executable, "-P", "-c", _SERVE, str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                            stdout=self._log, stderr=self._log, start_new_session=True)
        finally:
            theirs.close()
        self.connection = multiprocessing.connection.Connection(ours.detach())
        self.busy = False  # a call whose reply has not been read (interrupted): the next reply is not ours

    def call(self, name: str, *args: Any, payload: memoryview | bytes | None = None) -> Any:
        """``name(*args)`` in the driver process (``payload``: raw bytes sent after the call); its result, or
        the :class:`KernelDistillError` it raised. Raises :class:`_Ended` if the process is gone."""
        if self.busy:
            raise KernelDistillError("the Ray driver process is still busy with an interrupted call")
        self.busy = True
        try:
            self.connection.send((name, args))
            if payload is not None:
                self.connection.send_bytes(payload)
            status, value = self.connection.recv()
        except (EOFError, OSError):
            raise _Ended() from None
        self.busy = False
        if status == "ok":
            return value
        if status == "error":
            raise value
        raise RuntimeError(f"the Ray driver process failed in {name}:\n{value}")

    def exit_code(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def last_line(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def close(self, timeout: float = 60.0, cluster_stopped: bool = False) -> None:
        """Ask the driver process to end its backend and exit; SIGTERM (then SIGKILL) if it cannot answer.
        With ``cluster_stopped`` SIGKILL at once: its actors ended with the cluster, and Ray's shutdown
        would wait seconds for the processes that are gone."""
        if cluster_stopped and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.poll() is None and not self.busy:
            try:
                self.connection.send(("close", ()))
                if self.connection.poll(timeout):
                    self.connection.recv()
            except (EOFError, OSError):
                pass
        if self.exit_code(10.0 if not self.busy else 0.0) is None:
            self.process.terminate()  # serve() ends its backend on SIGTERM too
            if self.exit_code(30.0) is None:
                self.process.kill()
                self.process.wait()
        for stream in (self.connection, self._log):
            try:
                stream.close()
            except OSError:
                pass


class RayDriverBackend(ShareBlocks, Backend):
    """The Ray backend with its driver in a process of its own (see the module's docstring). The same
    methods and attributes as :class:`~kernel_distill.distributed.ray_backend.RayBackend`; ``head`` is the
    Ray instance it started (``None`` on a cluster given by address), ``driver`` the driver process."""

    name = "ray"

    def __init__(self, driver: DriverProcess, head: cluster.LocalRayHead | None, log=print):
        self.driver: DriverProcess | None = driver  # None once closed
        self.head, self.log = head, log
        self.workers: list[dict] = []
        self.num_workers, self.retries = 0, 0
        self.last_step: dict = {}
        self._addresses: tuple[str | None, str | None] = (head.address if head is not None else None, None)
        self._resident: dict[tuple, tuple] = {}
        self._stopped = False

    @classmethod
    def start(cls, workers: int | None = None, address: str | None = None, retries: int = 3,
              log: Callable[[str], None] = print) -> RayDriverBackend:
        """Start a Ray of its own (``address=None``, on loopback) or check ``address``, then the driver
        process, which connects and starts the ``workers`` actors."""
        if importlib.util.find_spec("ray") is None:
            raise KernelDistillError("--backend ray needs Ray: pip install 'kernel-distill[ray]'")
        head = backend = None
        try:
            if address is None:
                head = cluster.LocalRayHead(workers or os.cpu_count() or 1)
                target, grace = head.address, 0.0
            else:
                target, grace = cluster.check_address(address), cluster.GCS_GRACE_S
            backend = cls(DriverProcess(), head, log)
            info = backend._call("start", dict(workers=workers, address=target, retries=retries, gcs_grace_s=grace))
        except BaseException:
            if backend is not None:
                backend.close()
            elif head is not None:
                head.close()
            raise
        backend.workers, backend.retries = info["workers"], info["retries"]
        backend.num_workers = len(backend.workers)
        backend._addresses = (info["gcs"], info["raylet"])
        return backend

    def _call(self, name: str, *args, payload=None):
        if self.driver is None:
            raise KernelDistillError("this Ray backend is closed")
        try:
            return self.driver.call(name, *args, payload=payload)
        except ClusterStopped:
            self._stopped = True
            raise
        except _Ended:
            raise self._driver_ended() from None

    def _driver_ended(self) -> KernelDistillError:
        """Why the driver process ended: the cluster stopped (checked a few times: a raylet that took the
        driver with it may take a moment to stop answering), else the process's exit code and last line."""
        driver = self.driver
        assert driver is not None  # only _call, which checked it, gets here
        driver.busy = False
        code = driver.exit_code(10.0)
        watch = cluster.ClusterWatch(*self._addresses, grace_s=0.0)
        for _ in range(10):
            try:
                watch.check()
            except ClusterStopped as stopped:
                self._stopped = True
                return stopped
            time.sleep(0.2)
        return KernelDistillError(f"the Ray driver process of this command ended unexpectedly (exit code {code}): "
                                  f"{driver.last_line()}")

    def describe(self) -> dict:
        return dict(backend=self.name, workers=self.num_workers, retries=self.retries,
                    devices=sorted({d for w in self.workers for d in w["devices"]}))

    def worker_info(self) -> list[dict]:
        """``index``, ``pid``, ``node`` and ``devices`` of every worker (now: a restarted one has a new pid)."""
        return self._call("worker_info")

    def check_cluster(self) -> None:
        self._call("check_cluster")

    def put(self, array: np.ndarray) -> Resident:
        """Hand ``array`` to the driver process once (raw bytes), which puts it in Ray's object store; the same
        array (same memory, shape, dtype) again returns the same handle."""
        array = np.asarray(array)
        key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)
        if key not in self._resident:
            data = np.ascontiguousarray(array)
            handle = Resident(len(self._resident), data.shape)
            # numpy's stubs give ndarray its __buffer__ (the Buffer protocol) on Python >= 3.12 only; it has one on 3.11
            self._call("put", handle.key, data.shape, data.dtype.str,
                       payload=memoryview(data.reshape(-1)).cast("B"))  # type: ignore[arg-type]
            self._resident[key] = (array, handle)  # holding the array: no reused memory
        return self._resident[key][1]

    def forward_shares(self, kernel_fn: KernelFn, get: Get, dtype: str, support: np.ndarray, train: Resident,
                       idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        return self._call("forward_shares", kernel_fn, get, dtype, support, train, idx)

    def backward_shares(self, d_kts: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...], dict]:
        return self._call("backward_shares", d_kts, g)

    def normal_equations(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, x: Resident, y: Resident,
                         block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self._call("normal_equations", kernel_fn, get, np.asarray(x_support), x, y, block_size)

    def predictions(self, kernel_fn: KernelFn, get: Get, x_support: np.ndarray, alpha: np.ndarray, x: Resident,
                    block_size: int) -> np.ndarray:
        return self._call("predictions", kernel_fn, get, np.asarray(x_support), np.asarray(alpha), x, block_size)

    def close(self) -> None:
        """End the driver process (which ends the actors and disconnects), then the Ray this backend started."""
        if self._stopped and self.head is not None:  # end what is left of it first: the driver then exits quickly
            self.head.close(cluster_stopped=True)
            self.head = None
        if self.driver is not None:
            self.driver.close(cluster_stopped=self._stopped)
            self.driver = None
        if self.head is not None:
            self.head.close()
            self.head = None
        self._resident.clear()


def serve(fd: int) -> int:
    """The driver process: answer the calls of :class:`DriverProcess` on the socket ``fd`` until ``close``,
    the command's end closing, or SIGTERM; then end the backend (its actors, its connection to Ray)."""
    from kernel_distill.distributed.ray_backend import RayBackend

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the command's: it closes us
    connection = multiprocessing.connection.Connection(fd)
    backend, resident = None, {}
    try:
        while True:
            try:
                name, args = connection.recv()
            except (EOFError, OSError):
                return 0
            try:
                if name == "start":
                    backend = RayBackend.start(**args[0])
                    watch = backend.watch
                    value = dict(workers=backend.workers, retries=backend.retries,
                                 gcs=watch.gcs if watch else None, raylet=watch.raylet if watch else None)
                elif name == "put":
                    key, shape, dtype = args
                    array = np.frombuffer(connection.recv_bytes(), np.dtype(dtype)).reshape(shape)
                    if backend is None:
                        raise KernelDistillError("put before the Ray backend started")
                    resident[key] = backend.put(array)
                    value = None
                elif name == "close":
                    if backend is not None:
                        backend.close()
                        backend = None
                    connection.send(("ok", None))
                    return 0
                elif name in CALLS:
                    args = tuple(resident[a.key] if isinstance(a, Resident) else a for a in args)
                    value = getattr(backend, name)(*args)
                else:
                    raise ValueError(f"unknown call {name!r}")
                reply: tuple[str, object] = ("ok", value)
            except KernelDistillError as e:
                reply = ("error", type(e)(str(e)))
            except Exception:
                reply = ("bug", traceback.format_exc())
            connection.send(reply)
    finally:
        if backend is not None:
            backend.close()
