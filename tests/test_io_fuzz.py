"""Property: whatever bytes a .npz holds, loading it gives a DistilledSet or one KernelDistillError, never a crash."""

from __future__ import annotations

import io
import pathlib
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernel_distill.errors import KernelDistillError  # noqa: E402
from kernel_distill.io import DistilledSet, load_distilled, save_distilled  # noqa: E402
from kernel_distill.preprocess import Preprocessor  # noqa: E402


def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    distilled = DistilledSet(rng.normal(size=(4, 4, 4, 1)).astype(np.float32),
                             (np.eye(4) - 0.25).astype(np.float32),
                             Preprocessor(np.zeros(1, np.float32), np.ones(1, np.float32),
                                          np.eye(16, dtype=np.float32)),
                             dict(dataset="digits", method="kip", kernel=dict(architecture="fc"), reg=1e-6))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_distilled(pathlib.Path(tmp) / "set.npz", distilled)
        plain = path.read_bytes()
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return dict(plain=plain, compressed=buffer.getvalue())


FILES = _valid_files()


def _load(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "fuzzed.npz"
        path.write_bytes(data)
        try:
            return load_distilled(path)
        except KernelDistillError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return e


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(FILES)), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                       st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_bytes_load_or_fail_cleanly(kind, edits):
    data = bytearray(FILES[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    result = _load(bytes(data))
    if isinstance(result, DistilledSet):  # the bytes hit something unchecked (padding, a timestamp): still valid
        assert np.all(np.isfinite(result.images)) and result.images.ndim == 4


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(FILES)), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_fail_cleanly(kind, fraction):
    data = FILES[kind]
    assert isinstance(_load(data[:int(fraction * len(data))]), KernelDistillError)
