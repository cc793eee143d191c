"""The distilled-set file: round trip, the released KIP format, malformed files, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kernel_distill.errors import KernelDistillError
from kernel_distill.io import DistilledSet, atomic_write_bytes, load_distilled, save_distilled
from kernel_distill.preprocess import fit_preprocessor


@pytest.fixture
def distilled(rng):
    raw = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    pre = fit_preprocessor(raw, zca=True)
    labels = rng.normal(size=(6, 10)).astype(np.float32)
    meta = dict(dataset="cifar10", method="kip", step=12, kernel=dict(architecture="fc", depth=1))
    return DistilledSet(pre.apply(raw[:6]), labels, pre, meta)


def test_round_trip_keeps_everything(tmp_path, distilled):
    path = save_distilled(tmp_path / "out" / "set.npz", distilled)
    loaded = load_distilled(path)
    np.testing.assert_array_equal(loaded.images, distilled.images)
    np.testing.assert_array_equal(loaded.labels, distilled.labels)
    np.testing.assert_array_equal(loaded.preprocessor.zca_matrix, distilled.preprocessor.zca_matrix)
    np.testing.assert_array_equal(loaded.preprocessor.mean, distilled.preprocessor.mean)
    assert loaded.metadata["step"] == 12 and loaded.metadata["kernel"]["depth"] == 1
    assert "package_version" in loaded.metadata
    with np.load(path) as f:  # documented keys, readable with plain numpy, no pickle
        assert set(f.files) == {"images", "labels", "preprocess_mean", "preprocess_std", "zca_matrix", "metadata"}
        assert f["images"].dtype == np.float32 and json.loads(str(f["metadata"]))["method"] == "kip"


def test_float16_images_halve_the_file_and_read_back_as_their_float32_rounding(tmp_path, distilled):
    path = save_distilled(tmp_path / "half.npz", distilled, image_dtype="float16")
    with np.load(path) as f:
        assert f["images"].dtype == np.float16 and f["labels"].dtype == np.float32
        assert f["images"].nbytes * 2 == np.asarray(distilled.images, np.float32).nbytes
    loaded = load_distilled(path)
    assert loaded.images.dtype == np.float32
    np.testing.assert_array_equal(loaded.images, distilled.images.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(loaded.labels, distilled.labels)
    with pytest.raises(KernelDistillError, match="float16 range"):
        save_distilled(tmp_path / "big.npz", DistilledSet(distilled.images * 1e6, distilled.labels,
                                                         distilled.preprocessor, distilled.metadata),
                       image_dtype="float16")
    with pytest.raises(KernelDistillError, match="image_dtype"):
        save_distilled(tmp_path / "x.npz", distilled, image_dtype="int8")


def test_released_kip_files_load(tmp_path, rng):
    path = tmp_path / "kip_release.npz"
    np.savez(path, images=rng.normal(size=(10, 28, 28, 1)).astype(np.float32),
             labels=rng.normal(size=(10, 10)).astype(np.float32))
    loaded = load_distilled(path)
    assert loaded.preprocessor is None and loaded.metadata == {} and loaded.num_classes == 10


@pytest.mark.parametrize("arrays,match", [
    (dict(images=np.zeros((2, 4, 4, 1), np.float32)), "missing array"),
    (dict(images=np.zeros((2, 16), np.float32), labels=np.zeros((2, 3), np.float32)), "NHWC"),
    (dict(images=np.zeros((2, 4, 4, 1), np.float32), labels=np.zeros((3, 3), np.float32)), "n = 2"),
    (dict(images=np.full((2, 4, 4, 1), np.nan, np.float32), labels=np.zeros((2, 3), np.float32)), "NaN"),
    (dict(images=np.zeros((2, 4, 4, 1), np.float32), labels=np.array([0, 1])), "integer class ids"),
])
def test_malformed_files_name_the_problem(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(KernelDistillError, match=match):
        load_distilled(path)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 10)
    with pytest.raises(KernelDistillError, match="junk.npz: not a readable"):
        load_distilled(tmp_path / "junk.npz")
    with pytest.raises(KernelDistillError, match="no such file"):
        load_distilled(tmp_path / "absent.npz")


def test_failed_write_keeps_the_old_file(tmp_path, distilled, monkeypatch):
    path = save_distilled(tmp_path / "set.npz", distilled)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["set.npz"]  # no temporary file left behind
