"""Distributed backends: the Ray backend computes exactly what the local one does, and survives a killed worker.

One Ray instance for the module, on loopback (127.0.0.1), without dashboard or token, shut down at the end;
the tests before its first use start (and stop) Ray instances of their own, through the backend. A Ray
system process killed, or an address where nothing answers, ends a command with one line.
Sizes are tiny (8x8 images, depth 2, a few steps): the tests are about the bookkeeping, not throughput.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import pytest

from kernel_distill.distributed.cluster import (ClusterStopped, ClusterUnreachable, LocalRayHead,  # noqa: E402
                                                check_address)
from kernel_distill.distributed.ray_backend import LOOPBACK_ENVIRONMENT, RayBackend, WorkerFailed  # noqa: E402

for _name, _value in LOOPBACK_ENVIRONMENT.items():  # before Ray is imported: it reads them at import
    os.environ.setdefault(_name, _value)
ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e '.[ray]'")
psutil = pytest.importorskip("psutil", reason="installed with Ray")

from kernel_distill import kernels  # noqa: E402
from kernel_distill.data import prepare_dataset  # noqa: E402
from kernel_distill.distributed import BackendOptions, LocalBackend, open_backend  # noqa: E402
from kernel_distill.errors import KernelDistillError  # noqa: E402
from kernel_distill.io import DistilledSet, load_distilled, save_distilled  # noqa: E402
from kernel_distill.kernels import KernelSpec, make_kernel_fn  # noqa: E402
from kernel_distill.kip import KipConfig, load_checkpoint, run_kip  # noqa: E402
from kernel_distill.objective import backend_loss_and_gradients  # noqa: E402
from kernel_distill.krr import evaluate, krr_loss  # noqa: E402
from kernel_distill.label_solve import solve_labels  # noqa: E402
from kernel_distill.preprocess import centered_one_hot  # noqa: E402

SHAPES = {"fc": (6, 5, 2), "convnet": (8, 8, 2)}


def test_cli_starts_ray_on_loopback_and_shuts_it_down(tmp_path, capsys):
    """``label-solve --backend ray`` with no address starts a Ray of its own (before the module's instance
    exists) and stops it; its labels equal the local command's. A misplaced option is a one-line error."""
    from kernel_distill.cli import main

    common = ["label-solve", "--dataset", "digits", "--support-size", "20", "--train-limit", "300", "--block-size",
              "70", "--test-limit", "100", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--backend", "ray", "--workers", "2"]) == 0
    assert not ray.is_initialized()
    local, ours = (load_distilled(tmp_path / name / "distilled.npz") for name in ("local", "ray"))
    np.testing.assert_allclose(ours.labels, local.labels, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--workers", "2"]) == 2
    assert "--workers and --ray-address need --backend ray" in capsys.readouterr().err


def _closed_port() -> int:
    """A loopback port where nothing listens (just released by this process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_at_once_with_one_line(tmp_path):
    """``--ray-address`` where nothing listens: exit code 2 in seconds (Ray itself retries for many minutes),
    one stderr line naming the address, no traceback, no Ray log lines."""
    rng = np.random.default_rng(0)
    save_distilled(tmp_path / "set.npz", DistilledSet(rng.standard_normal((10, 8, 8, 1)).astype(np.float32),
                                                      np.eye(10, dtype=np.float32), metadata=dict(dataset="digits")))
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kernel_distill.cli", "evaluate", str(tmp_path / "set.npz"),
                           "--backend", "ray", "--ray-address", address, "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert seconds < 30
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"kernel-distill: error: cannot connect to the Ray cluster at {address}: nothing "
                               f"answers there (connection refused)")


def test_an_address_where_something_else_answers_is_not_a_ray_cluster():
    """A server that is not gRPC (say the dashboard's HTTP port) is refused at once; so is a malformed address."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer():
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ClusterUnreachable, match=f"at {address}: something answers there, but not a Ray"):
            BackendOptions("ray", address=address)
    with pytest.raises(KernelDistillError, match="--ray-address takes 'auto' or HOST:PORT, got 'nowhere'"):
        check_address("nowhere")


def _work(rng):
    """A tiny FC problem in float32 (JAX's precision here): support, KRR weights, 30 resident images."""
    x_s, alpha, x = (rng.standard_normal(shape).astype(np.float32) for shape in ((5, 6), (5, 2), (30, 6)))
    return make_kernel_fn(KernelSpec("fc", 1)), x_s, alpha, x


def test_ray_backend_of_its_own_forks_nothing_here_and_a_killed_gcs_is_one_error(rng):
    """With JAX running here and no Ray initialised, a command's Ray backend (``open_backend``) starts Ray in
    a fresh interpreter (``ray_head.py``) and its driver in another (``driver.py``): nothing forks this
    process (JAX warns at every fork of a JAX process) and this process never connects to Ray. Through the
    driver process a KIP step and KRR predictions equal the local backend's. The GCS server killed: the next
    call raises ClusterStopped, one line naming it, within seconds; ``close`` leaves no process of it behind."""
    assert not ray.is_initialized()
    jax.devices()  # JAX's at-fork warning is armed from here on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = open_backend(BackendOptions("ray", workers=2, retries=1))
    processes = []
    try:
        assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]
        assert not ray.is_initialized() and backend.num_workers == 2
        kernel_fn, x_s, alpha, x = _work(rng)
        y_s, y_t = rng.standard_normal((5, 2)).astype(np.float32), rng.standard_normal((9, 2)).astype(np.float32)
        idx = rng.choice(30, 9, replace=False)
        resident = backend.put(x)
        ours = backend_loss_and_gradients(backend, kernel_fn, "ntk", 1e-3, x_s, y_s, resident, idx, y_t)
        local = backend_loss_and_gradients(LocalBackend(), kernel_fn, "ntk", 1e-3, x_s, y_s, x, idx, y_t)
        assert backend.last_step["workers_used"] == 2
        for got, ref in zip(ours, local):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(backend.predictions(kernel_fn, "ntk", x_s, alpha, resident, 8),
                                   LocalBackend().predictions(kernel_fn, "ntk", x_s, alpha, x, 8), rtol=1e-5)
        head = psutil.Process(backend.head.pid)
        processes = head.children(recursive=True)
        next(p for p in processes if p.name() == "gcs_server").kill()
        killed = time.monotonic()
        with pytest.raises(ClusterStopped) as error:
            while time.monotonic() - killed < 60:
                backend.predictions(kernel_fn, "ntk", x_s, alpha, resident, 8)
        assert time.monotonic() - killed < 30
        message = str(error.value)
        assert message.startswith("the Ray cluster stopped: its GCS server (127.0.0.1:") and "\n" not in message
    finally:
        backend.close()
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:  # only if the test fails: leave nothing of ours behind
            process.kill()
    assert not ray.is_initialized() and backend.head is None and backend.driver is None
    assert not alive


def test_killed_raylet_ends_the_command_with_one_line(tmp_path):
    """``kip --backend ray``: its raylet SIGKILLed (found by pid in the command's own process tree) while the
    worker computes steps; the command exits with code 2 and one stderr line, not Ray's logs."""
    command = subprocess.Popen(
        [sys.executable, "-m", "kernel_distill.cli", "kip", "--dataset", "digits", "--per-class", "1",
         "--target-batch", "50", "--steps", "100000", "--eval-every", "100000", "--checkpoint-every", "100000",
         "--backend", "ray", "--workers", "1", "--no-progress", "--out", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.monotonic() + 120, None
        while killed is None and command.poll() is None and time.monotonic() < deadline:
            tree = psutil.Process(command.pid).children(recursive=True)
            if any("KernelWork" in p.name() for p in tree):  # ray::KernelWorker: steps are running
                time.sleep(1.0)
                next(p for p in tree if p.name() == "raylet").kill()
                killed = time.monotonic()
            time.sleep(0.2)
        assert killed is not None, "the run never started its worker"
        _, stderr = command.communicate(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if command.poll() is None:  # only if the test fails (its Ray head stops when this pipe closes)
            command.kill()
            command.wait()
    assert command.returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kernel-distill: error: the Ray cluster stopped: the raylet of this node "
                               "(127.0.0.1:")


@pytest.fixture(scope="module")
def ray_instance():
    """Ray on loopback for this module, no dashboard, no token; shut down after. Six logical CPUs: the
    three-worker backend lives for the whole module beside the two-worker ones of the fault tests. Started
    the backend's way (a fresh interpreter starts Ray's processes; this JAX process only connects)."""
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and os.environ["RAY_AUTH_MODE"] == "disabled"
    head = LocalRayHead(num_cpus=6)
    try:
        ray.init(address=head.address, configure_logging=False, log_to_driver=False)
        try:
            assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
            yield
        finally:
            ray.shutdown()
    finally:
        head.close()


@pytest.fixture(scope="module")
def three_workers(ray_instance):
    backend = RayBackend.start(workers=3, retries=1)
    try:
        yield backend
    finally:
        backend.close()


def _tiled(spec, shape):
    """A kernel function whose tiles hold about 2 x 3 pairs: every share is itself split into tiles."""
    budget = 6 * kernels.bytes_per_pair(spec, shape, 8)
    return make_kernel_fn(spec, memory_budget_bytes=budget, tile_bytes=budget)


@pytest.mark.parametrize("architecture", ["fc", "convnet"])
def test_ray_kip_loss_and_gradients_equal_local_and_jax_grad(x64, rng, three_workers, architecture):
    """7 support images, 11 targets drawn from 20 resident training images, 3 workers (uneven shares)."""
    shape = SHAPES[architecture]
    # FC in tiles of 2 x 3 pairs (each share tiled again); ConvNet depth 1 in whole blocks (compiles faster)
    spec = KernelSpec(architecture, 2 if architecture == "fc" else 1)
    kernel_fn = _tiled(spec, shape) if architecture == "fc" else make_kernel_fn(spec)
    x_s, y_s = rng.standard_normal((7, *shape)), rng.standard_normal((7, 3))
    train = rng.standard_normal((20, *shape))
    idx = rng.choice(20, 11, replace=False)
    y_t = rng.standard_normal((11, 3))
    ours = backend_loss_and_gradients(three_workers, kernel_fn, "ntk", 1e-3, x_s, y_s, three_workers.put(train), idx,
                                      y_t)
    local = backend_loss_and_gradients(LocalBackend(), kernel_fn, "ntk", 1e-3, x_s, y_s, train, idx, y_t)

    def whole(a, b):
        return krr_loss(kernel_fn(train[idx], a), kernel_fn(a, a), b, y_t, 1e-3)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(whole, argnums=(0, 1)))(x_s, y_s)
    assert ours[1].dtype == np.float64 and three_workers.last_step["workers_used"] == 3
    for loss in (ours[0], local[0]):
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-10)
    for grads in (ours[1:], local[1:]):
        for got, ref in zip(grads, ref_grads):
            assert float(np.abs(np.asarray(got) - ref).max()) <= 1e-10 * float(np.abs(ref).max())
    step = three_workers.last_step
    assert step["bytes_sent"] > x_s.nbytes and step["bytes_received"] >= 3 * x_s.nbytes


def test_ray_label_solve_and_evaluation_equal_local(x64, rng, three_workers):
    """Blocks of 4 over 18 training images (the last one padded), 13 test images in blocks of 5."""
    shape = SHAPES["convnet"]
    kernel_fn = _tiled(KernelSpec("convnet", 1), shape)
    x_s = rng.standard_normal((6, *shape))
    x_train, labels_train = rng.standard_normal((18, *shape)), rng.integers(0, 3, 18)
    y_train = centered_one_hot(labels_train, 3)
    local = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, progress=False)
    ours = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, progress=False, backend=three_workers)
    assert ours.num_train == local.num_train == 18
    for got, ref in ((ours.gram, local.gram), (ours.projected_targets, local.projected_targets),
                     (ours.labels, local.labels)):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # A checkpointed pass on the cluster, continued from its second chunk's sums: the same bits as one pass.
    seen = []
    chunked = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, progress=False, backend=three_workers,
                           chunk_blocks=2, on_chunk=seen.append)
    continued = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, progress=False, backend=three_workers,
                             chunk_blocks=2, start=seen[1])
    assert [s.count for s in seen] == [8, 16, 18]
    np.testing.assert_array_equal(continued.gram, chunked.gram)
    np.testing.assert_array_equal(continued.labels, chunked.labels)
    np.testing.assert_allclose(chunked.labels, local.labels, rtol=1e-10, atol=1e-12 * np.abs(local.labels).max())
    x_test, labels_test = rng.standard_normal((13, *shape)), rng.integers(0, 3, 13)
    ref = evaluate(kernel_fn, x_s, local.labels, x_test, labels_test, block_size=5, progress=False)
    got = evaluate(kernel_fn, x_s, local.labels, x_test, labels_test, block_size=5, progress=False,
                   backend=three_workers)
    assert got.accuracy == ref.accuracy and got.num_test == 13
    np.testing.assert_allclose(got.mse_loss, ref.mse_loss, rtol=1e-10)


def test_ray_label_solve_and_evaluation_with_the_random_feature_kernel_equal_local(x64, rng, three_workers):
    """The random-feature kernel travels to the workers like the exact one: the same fixed networks (its
    seed is in the spec), so the workers' blocks equal the local ones."""
    from kernel_distill.kernels import RandomFeatures

    shape = SHAPES["convnet"]
    kernel_fn = make_kernel_fn(KernelSpec("convnet3", 2, random_features=RandomFeatures(models=2, width=8, seed=3)))
    x_s = rng.standard_normal((6, *shape))
    x_train, y_train = rng.standard_normal((14, *shape)), centered_one_hot(rng.integers(0, 3, 14), 3)
    local = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, get="nngp", progress=False)
    ours = solve_labels(kernel_fn, x_s, x_train, y_train, block_size=4, get="nngp", progress=False,
                        backend=three_workers)
    np.testing.assert_allclose(ours.labels, local.labels, rtol=1e-10, atol=1e-12 * np.abs(local.labels).max())
    x_test, labels_test = rng.standard_normal((9, *shape)), rng.integers(0, 3, 9)
    ref = evaluate(kernel_fn, x_s, local.labels, x_test, labels_test, block_size=5, get="nngp", progress=False)
    got = evaluate(kernel_fn, x_s, local.labels, x_test, labels_test, block_size=5, get="nngp", progress=False,
                   backend=three_workers)
    assert got.accuracy == ref.accuracy
    np.testing.assert_allclose(got.mse_loss, ref.mse_loss, rtol=1e-10)


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset("digits", progress=False, val_size=100)


def _config(**kwargs):
    base = dict(dataset="digits", per_class=1, kernel=KernelSpec("fc", 1), learn_labels=True, target_batch_size=60,
                steps=4, eval_every=4, checkpoint_every=1, log_every=1, float64=True, val_size=100)
    base.update(kwargs)
    return KipConfig(**base)


class _KillWorkerDuringStep:
    """A backend that SIGKILLs one worker's process while KIP step ``at`` is being computed."""

    def __init__(self, backend, worker: int, at: int, delay: float = 0.02):
        self.backend, self.worker, self.at, self.delay, self.calls, self.killed = backend, worker, at, delay, 0, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward_blocks(self, *args):  # once per KIP step
        self.calls += 1
        if self.calls == self.at:
            pid = self.backend.worker_info()[self.worker]["pid"]
            self.killed.append(pid)
            threading.Timer(self.delay, os.kill, (pid, signal.SIGKILL)).start()
        return self.backend.forward_blocks(*args)


def test_killed_worker_is_restarted_and_the_run_ends_with_the_same_support(tmp_path, ray_instance, digits):
    """A worker killed (by pid) in the middle of step 2 is restarted, its blocks recomputed: the support equals
    an undisturbed Ray run's and, to float64 rounding, the local run's; the history names the backend."""
    local = run_kip(_config(), digits, tmp_path / "local", progress=False)
    with RayBackend.start(workers=2, retries=2) as backend:
        run_kip(_config(), digits, tmp_path / "calm", progress=False, backend=backend)
        killer = _KillWorkerDuringStep(backend, worker=1, at=2)
        run_kip(_config(), digits, tmp_path / "killed", progress=False, backend=killer)
        assert backend.worker_info()[1]["pid"] != killer.killed[0]  # a restarted process did the rest
    calm, killed = (load_distilled(tmp_path / name / "distilled.npz") for name in ("calm", "killed"))
    np.testing.assert_array_equal(killed.images, calm.images)
    np.testing.assert_array_equal(killed.labels, calm.labels)
    reference = load_distilled(tmp_path / "local" / "distilled.npz")
    np.testing.assert_allclose(calm.images, reference.images, rtol=1e-9, atol=1e-12)
    assert local["step"] == 4
    history = [json.loads(line) for line in (tmp_path / "killed" / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["backend"]["backend"] == "ray" and history[0]["backend"]["workers"] == 2


def test_worker_that_fails_for_good_names_itself_and_keeps_the_checkpoint(tmp_path, ray_instance, digits):
    """retries=0: the first kill is final. The error names the worker; the step-1 checkpoint resumes (a killed
    driver resumes the same way) to the same support as an uninterrupted run."""
    with RayBackend.start(workers=2, retries=0) as backend:
        killer = _KillWorkerDuringStep(backend, worker=0, at=2, delay=0.0)
        with pytest.raises(WorkerFailed, match=r"Ray worker 0, pid \d+ at start.*after 0 restart"):
            run_kip(_config(), digits, tmp_path / "run", progress=False, backend=killer)
    _, state = load_checkpoint(tmp_path / "run")
    assert state.step == 1
    with RayBackend.start(workers=2, retries=0) as backend:
        run_kip(_config(), digits, tmp_path / "run", resume=True, progress=False, backend=backend)
        run_kip(_config(), digits, tmp_path / "whole", progress=False, backend=backend)
    resumed, whole = (load_distilled(tmp_path / name / "distilled.npz") for name in ("run", "whole"))
    np.testing.assert_array_equal(resumed.images, whole.images)


def test_backend_options_are_checked():
    with pytest.raises(KernelDistillError, match="--backend must be one of local, ray"):
        BackendOptions("dask")
    with pytest.raises(KernelDistillError, match="--workers must be a positive integer"):
        BackendOptions("ray", workers=0)
    with pytest.raises(KernelDistillError, match="need --backend ray"):
        BackendOptions("local", workers=2)
    assert isinstance(open_backend(BackendOptions()), LocalBackend)
