"""Shared fixtures. Real data comes from ``../shared/data`` (or ``$KERNEL_DISTILL_DATA``)."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile


def _share_compilations_across_processes() -> None:
    """One JAX compilation cache for this test run, shared by the xdist workers and every CLI subprocess
    they start (they inherit the variable): the same KIP step is otherwise compiled again in each
    process (measured: the SIGKILL/resume test took 43 s of CPU without it, 26 s with it). A fresh folder
    per run, removed at exit, so a run never reuses another's work and its time is what CI will see.
    Set before JAX is imported, which reads it then."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # an xdist worker or a subprocess: the run's folder
        return
    folder = tempfile.mkdtemp(prefix="kernel-distill-test-jax-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def _one_thread_per_worker() -> None:
    """With several xdist workers, each runs XLA (and the BLAS behind numpy) on one thread: the workers already
    fill the cores, and two threads per worker on them only contend (an evaluation-ConvNet step: 0.61 s with
    XLA's default threads, 0.44 s on one, alone on 2 cores). A value the user set is kept."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


_share_compilations_across_processes()
_one_thread_per_worker()

import jax  # noqa: E402  (after the cache folder is set)
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "goldens"


def _shared_data_dir() -> pathlib.Path | None:
    for candidate in (os.environ.get("KERNEL_DISTILL_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (pathlib.Path(candidate) / "mnist" / "test.npz").is_file():
            return pathlib.Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """The real datasets; tests about accuracy on real data are skipped (loudly) without them."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip("real data not found: put the shared data folder at ../shared/data or set KERNEL_DISTILL_DATA")
    return path


@pytest.fixture
def x64():
    """Run the test body with float64 enabled, restoring the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path_factory):
    """No test downloads from the internet or writes to the user's cache by accident."""
    monkeypatch.setenv("KERNEL_DISTILL_MIRROR", "http://127.0.0.1:9/")  # discard port: fails fast, locally
    # recomputed ZCA matrices (zca_recipes) are cached per test session, never in the user's cache
    # (one folder for all xdist workers of a run: a CIFAR-10 refit costs half a minute; writes are atomic)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    monkeypatch.setenv("KERNEL_DISTILL_CACHE", str(shared / "kernel-distill-cache"))
    if os.environ.get("KERNEL_DISTILL_DATA") is None:  # the shared data as CI sets it, else an empty folder
        shared = _shared_data_dir()
        monkeypatch.setenv("KERNEL_DISTILL_DATA", str(shared or tmp_path_factory.mktemp("no-data-here")))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
