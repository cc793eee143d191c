"""Reaching a Ray cluster, starting one of the command's own, and noticing when it stops.

Three things Ray itself does badly for a command line, done here before and around Ray:

* an address where nothing answers: ``ray.init(address=...)`` retries for many minutes (about 35 s per try,
  20 tries), printing its C++ log lines. :func:`check_address` connects to the address first (one TCP
  connection, :data:`PROBE_TIMEOUT_S` at most) and checks that a gRPC server answers there, so such an
  address fails at once with :class:`ClusterUnreachable`, one line that names it.
* starting Ray forks its system processes from the process that calls ``ray.init``, running Python code in
  the forked child (``subprocess.Popen(preexec_fn=...)``). In a driver where JAX runs its threads that is
  unsafe, and JAX warns ``os.fork() was called``. :class:`LocalRayHead` starts Ray in a fresh interpreter
  (``ray_head.py``, spawned, not forked from Python code) and the driver only connects to it.
* a Ray system process that dies (the GCS server, or the raylet of the driver's node) ends a run with Ray's
  log lines, an exception that blames an actor, or, when the GCS is gone for a minute, Ray's C++ code
  exiting the process. :class:`ClusterWatch` checks that both still answer; the backend raises
  :class:`ClusterStopped`, one line, when they do not.

Nothing here imports Ray at module level, nor JAX.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from kernel_distill.errors import KernelDistillError

if TYPE_CHECKING:
    from types import ModuleType

# A Ray started by this package listens on loopback only, without dashboard or token file. Ray reads these
# when it is imported (and its processes inherit them), so they are set before the first ``import ray``.
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
PROBE_TIMEOUT_S = 5.0  # connecting to a cluster's address, and reading its gRPC greeting
CHECK_TIMEOUT_S = 2.0  # one health check of the GCS or the raylet, while a run waits for its workers
GCS_GRACE_S = 20.0  # a GCS of another cluster may be restarting (GCS fault tolerance): wait this long
HEAD_START_TIMEOUT_S = 180.0
HEAD_SCRIPT = pathlib.Path(__file__).with_name("ray_head.py")
# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, Ray Client's server)
# answers with a SETTINGS frame of its own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


class ClusterUnreachable(KernelDistillError):
    """Nothing (or no Ray cluster) answers at the address given."""


class ClusterStopped(KernelDistillError):
    """The Ray cluster stopped while the command ran: its GCS server or this node's raylet is gone."""


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``"HOST:PORT"``, ``"[IPv6]:PORT"`` or ``"ray://HOST:PORT"``."""
    rest = address.strip()
    if rest.startswith("ray://"):
        rest = rest[len("ray://"):]
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KernelDistillError(f"--ray-address takes 'auto' or HOST:PORT, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_address(address: str) -> str:
    """The ``HOST:PORT`` (or ``ray://HOST:PORT``) that ``address`` names; ``"auto"`` as Ray would find it
    (``RAY_ADDRESS``, else the cluster ``ray start`` last started on this machine)."""
    if address != "auto":
        parse_address(address)
        return address
    import_ray(local=False)  # a missing Ray is reported as such
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # a Ray that moved it: let ray.init find the cluster
        return address
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise ClusterUnreachable("--ray-address auto: no running Ray cluster found on this machine (none started "
                                 "with `ray start`, RAY_ADDRESS not set); give HOST:PORT, or drop --ray-address to "
                                 "run a Ray of the command's own")
    return found


def check_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Check that a Ray cluster answers at ``address`` (``"auto"`` resolved first); returns the address
    resolved. Raises :class:`ClusterUnreachable` naming it when nothing, or something other than a gRPC
    server, answers there (within ``timeout`` seconds)."""
    resolved = resolve_address(address)
    host, port = parse_address(resolved)
    where = resolved if resolved == address else f"{resolved} (--ray-address {address})"
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {where}: cannot resolve {host!r} "
                                 f"({e.strerror})") from None
    except (socket.timeout, TimeoutError):
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {where}: nothing answers there (no "
                                 f"answer within {timeout:g} s)") from None
    except OSError as e:
        reason = "connection refused" if isinstance(e, ConnectionRefusedError) else (e.strerror or str(e))
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {where}: nothing answers there ({reason}); "
                                 f"is a Ray cluster running there (`ray start --head` prints its address)?") from None
    with connection:
        if _tls():
            return resolved  # a TLS server does not answer a plain HTTP/2 greeting
        try:
            connection.sendall(_HTTP2_PREFACE)
            greeting = _read(connection, 9, timeout)
        except OSError:
            greeting = b""
    if len(greeting) < 9 or greeting[3] != _HTTP2_SETTINGS:
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {where}: something answers there, but not a "
                                 f"Ray cluster (no gRPC server); give the GCS port that `ray start --head` printed "
                                 f"(default 6379), not the dashboard's")
    return resolved


def _tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _read(connection: socket.socket, size: int, timeout: float) -> bytes:
    deadline, data = time.monotonic() + timeout, b""
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        connection.settimeout(left)
        try:
            chunk = connection.recv(size - len(data))
        except (socket.timeout, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def answers(address: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether anything accepts a TCP connection at ``HOST:PORT``."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def import_ray(local: bool) -> ModuleType:
    """``import ray``; for a ``local`` instance (or a loopback address) first the loopback settings, unless
    the user set them."""
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


class LocalRayHead:
    """A Ray instance of one backend's own, on loopback: ``ray_head.py`` in a fresh interpreter, in a
    session of its own (a Ctrl-C reaches the driver only, which then stops the head). ``address`` is its
    GCS address, ``pid`` the head process's; :meth:`close` stops it and every Ray process it started. If the
    driver dies, the head sees its standard input close and stops too."""

    def __init__(self, num_cpus: int, timeout: float = HEAD_START_TIMEOUT_S):
        env = {k: v for k, v in os.environ.items() if k not in DRIVER_ONLY_ENVIRONMENT and k != "RAY_ADDRESS"}
        env.update(LOOPBACK_ENVIRONMENT)
        self._log = tempfile.TemporaryFile()  # the head's stderr: the reason, if it fails to start
        # No preexec_fn: Python starts the interpreter with vfork/exec, running no Python code in a child.
        self.process = subprocess.Popen([sys.executable, "-P", str(HEAD_SCRIPT), str(num_cpus)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        start_new_session=True)
        self.pid = self.process.pid
        try:
            self.address = self._wait_for_address(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelDistillError(f"the local Ray instance did not start within {timeout:g} s")
            stdout = self.process.stdout
            assert stdout is not None  # started with stdout=PIPE
            ready, _, _ = select.select([stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        try:
            return json.loads(line)["address"]
        except (ValueError, KeyError, TypeError):
            self.process.wait(timeout=10)
            raise KernelDistillError(f"the local Ray instance failed to start: {self._last_error()}") from None

    def _last_error(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {self.process.returncode}"

    def close(self, cluster_stopped: bool = False, timeout: float = 60.0) -> None:
        """Stop Ray (the head shuts it down when its standard input closes), then the head process; then end
        whatever of Ray is left in the head's session (a raylet's agents outlive a killed GCS). With
        ``cluster_stopped`` (its GCS or raylet is gone: nothing left to shut down in order) end them all at
        once."""
        if cluster_stopped:
            _kill_session(self.pid)
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:  # started with stdin=PIPE
                    self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        deadline = time.monotonic() + 5.0
        while _session_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill_session(self.pid)
        for stream in (self.process.stdin, self.process.stdout, self._log):
            if stream is None:
                continue
            try:
                stream.close()
            except OSError:
                pass


def _session_members(session: int) -> list[int]:
    """Live processes of the session ``session`` (its leader, a head we started, created it), from /proc
    (none where there is no /proc)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for entry in entries:
        if entry.isdigit() and _in_session(int(entry), session):
            members.append(int(entry))
    return members


def _in_session(pid: int, session: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (name) ": state ppid pgrp session ...
        return fields[0] != b"Z" and int(fields[3]) == session
    except (OSError, IndexError, ValueError):
        return False


def _kill_session(session: int) -> None:
    """SIGKILL every live process of ``session``, each checked to be in it just before (no reused pid)."""
    for pid in _session_members(session):
        if _in_session(pid, session):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# Settings for the driver's own Ray connection, not for Ray processes the head starts (they would keep a
# raylet waiting for a dead GCS for an hour).
DRIVER_ONLY_ENVIRONMENT = ("RAY_gcs_rpc_server_reconnect_timeout_s",)
# The driver's Ray ends the process (exit code 1, a C++ log line) when its GCS has been gone this long
# (Ray's default is 60 s). Longer here: :class:`ClusterWatch` notices first and stops the run with one line.
DRIVER_GCS_RECONNECT_TIMEOUT_S = 3600


class ClusterWatch:
    """Checks that the cluster's GCS server and this node's raylet still accept connections.

    A refused or timed-out connection to the raylet stops the run at once (Ray never restarts a raylet); the
    GCS gets ``grace_s`` seconds first (a cluster with GCS fault tolerance restarts it; a Ray that
    :class:`LocalRayHead` started has none, so ``grace_s`` is 0 there)."""

    def __init__(self, gcs: str | None, raylet: str | None, grace_s: float):
        self.gcs, self.raylet, self.grace_s = gcs, raylet, grace_s
        self.stopped: str | None = None
        self._gcs_silent_since: float | None = None

    def check(self) -> None:
        """Raise :class:`ClusterStopped` if the cluster is gone."""
        if self.stopped is None:
            self.stopped = self._problem()
        if self.stopped is not None:
            raise ClusterStopped(f"the Ray cluster stopped: {self.stopped}")

    def _problem(self) -> str | None:
        if self.raylet and not answers(self.raylet):
            return f"the raylet of this node ({self.raylet}) no longer answers (killed, or out of memory?)"
        if self.gcs:
            if answers(self.gcs):
                self._gcs_silent_since = None
            else:
                now = time.monotonic()
                self._gcs_silent_since = self._gcs_silent_since or now
                if now - self._gcs_silent_since >= self.grace_s:
                    waited = f" for {self.grace_s:g} s" if self.grace_s else ""
                    return f"its GCS server ({self.gcs}) no longer answers{waited} (killed, or out of memory?)"
        return None
