"""Datasets: the bundled digits, the shared real data, original formats, and downloads from a local server."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import stat
import tarfile
import threading

import jax
import numpy as np
import pytest

from kernel_distill import data
from kernel_distill.data import DataError, class_balanced_indices, load_dataset

# ----------------------------------------------------------------------------------------------------
# Fixtures in the original formats.


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _tiny_mnist(rng, n=20):
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@contextlib.contextmanager
def serve(files: dict[str, bytes], truncate_after: int | None = None):
    """Serve ``files`` by name over HTTP on 127.0.0.1 (an ephemeral port) for the duration of the block.

    ``truncate_after``: announce each file's whole length but close the connection after this many bytes.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            name = self.path.rsplit("/", 1)[-1]
            if name not in files:
                self.send_error(404)
                return
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if truncate_after is None else body[:truncate_after])
            if truncate_after is not None:
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_mnist(monkeypatch, rng):
    """MNIST's registry entry pointed at small fixture files, whose real MD5s are recorded."""
    x_train, y_train = _tiny_mnist(rng)
    x_test, y_test = _tiny_mnist(rng, 7)
    blobs = {
        "train-images-idx3-ubyte.gz": _idx_bytes(x_train), "train-labels-idx1-ubyte.gz": _idx_bytes(y_train),
        "t10k-images-idx3-ubyte.gz": _idx_bytes(x_test), "t10k-labels-idx1-ubyte.gz": _idx_bytes(y_test),
    }
    info = data.DATASETS["mnist"]
    files = {split: tuple(dataclasses.replace(f, md5=hashlib.md5(blobs[f.filename]).hexdigest())
                          for f in remote) for split, remote in info.files.items()}
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(info, files=files))
    return blobs, (x_train, y_train), (x_test, y_test)


# ----------------------------------------------------------------------------------------------------


def test_digits_is_builtin_deterministic_and_split():
    x_train, y_train = load_dataset("digits", "train")
    x_test, y_test = load_dataset("digits", "test")
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (8, 8, 1)
    assert len(x_train) + len(x_test) == 1797
    assert 0.19 < len(x_test) / 1797 < 0.21
    assert set(np.unique(y_test)) == set(range(10))
    assert x_train.max() == 255
    again, _ = load_dataset("digits", "test")
    np.testing.assert_array_equal(again, x_test)
    train_rows = {row.tobytes() + bytes([label]) for row, label in zip(x_train, y_train)}
    overlap = sum(row.tobytes() + bytes([label]) in train_rows for row, label in zip(x_test, y_test))
    assert overlap <= 2  # digits has a couple of exact duplicate images; the split itself is disjoint


def test_shared_mnist_matches_its_published_class_counts(shared_data_dir):
    x, y = load_dataset("mnist", "test", data_dir=shared_data_dir)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cifar10_falls_back_to_the_lossy_copy_with_a_warning(shared_data_dir):
    with pytest.warns(UserWarning, match="LOSSY"):
        x, y = load_dataset("cifar10", "test", data_dir=shared_data_dir)
    assert x.shape == (10000, 32, 32, 3)
    assert np.bincount(y).tolist() == [1000] * 10


def test_download_verify_parse_and_cache(tmp_path, monkeypatch, fake_mnist):
    blobs, (x_train, y_train), _ = fake_mnist
    with serve(blobs) as url:
        monkeypatch.setenv("KERNEL_DISTILL_MIRROR", url)
        x, y = load_dataset("mnist", "train", data_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(x[..., 0], x_train)
    np.testing.assert_array_equal(y, y_train)
    cached = tmp_path / "mnist" / "train.npz"
    assert cached.is_file()
    assert not list((tmp_path / "mnist").glob(".*"))  # no temporary files left behind
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp_path / "mnist").iterdir():  # downloads and the cache get the usual permissions, not 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name
    # Served no more: the cache alone answers.
    monkeypatch.setenv("KERNEL_DISTILL_MIRROR", "http://127.0.0.1:9/")
    x2, _ = load_dataset("mnist", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(x2, x)


def test_original_files_placed_by_hand_are_parsed(tmp_path, fake_mnist):
    blobs, _, (x_test, y_test) = fake_mnist
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    x, y = load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(x[..., 0], x_test)
    np.testing.assert_array_equal(y, y_test)


def test_checksum_mismatch_names_the_file_and_caches_nothing(tmp_path, monkeypatch, fake_mnist):
    blobs, _, _ = fake_mnist
    good = bytearray(blobs["train-images-idx3-ubyte.gz"])
    good[100] ^= 0xFF
    tampered = dict(blobs, **{"train-images-idx3-ubyte.gz": bytes(good)})
    with serve(tampered) as url:
        monkeypatch.setenv("KERNEL_DISTILL_MIRROR", url)
        with pytest.raises(DataError, match="checksum mismatch for train-images-idx3-ubyte.gz"):
            load_dataset("mnist", "train", data_dir=tmp_path, progress=False)
    # The first download created the dataset folder; nothing verified landed in it, so it is gone too.
    assert not (tmp_path / "mnist").exists()


def test_failed_download_says_which_url_and_where_to_put_the_file(tmp_path, monkeypatch, fake_mnist):
    with serve({}) as url:  # every request is a 404
        monkeypatch.setenv("KERNEL_DISTILL_MIRROR", url)
        with pytest.raises(DataError) as excinfo:
            load_dataset("mnist", "test", data_dir=tmp_path, progress=False)
    message = str(excinfo.value)
    assert url + "t10k-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in message


def test_truncated_download_is_refused_and_leaves_nothing(tmp_path, monkeypatch, fake_mnist):
    blobs, _, _ = fake_mnist
    with serve(blobs, truncate_after=60) as url:
        monkeypatch.setenv("KERNEL_DISTILL_MIRROR", url)
        with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
            load_dataset("mnist", "test", data_dir=tmp_path, progress=False)
    assert not (tmp_path / "mnist").exists()  # no partial file, no temporary file, no cache, no empty folder


def test_fetch_keeps_a_verified_file_and_replaces_a_corrupt_one(tmp_path):
    blob = b"zoo set bytes" * 100
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with serve({"set.npz": blob}) as url:
        path = data.fetch(url + "set.npz", digest, tmp_path, "set.npz", progress=False)
        assert path.read_bytes() == blob
        path.write_bytes(b"corrupted")
        assert data.fetch(url + "set.npz", digest, tmp_path, "set.npz", progress=False).read_bytes() == blob
    # Served no more: a verified file is not downloaded again.
    assert data.fetch("http://127.0.0.1:9/set.npz", digest, tmp_path, "set.npz").read_bytes() == blob


def test_truncated_original_file_is_a_clear_error(tmp_path, fake_mnist):
    blobs, _, _ = fake_mnist
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(blobs["t10k-images-idx3-ubyte.gz"][:50])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert not (folder / "test.npz").exists()


def test_corrupt_npz_is_a_clear_error(tmp_path):
    (tmp_path / "fashion_mnist").mkdir()
    (tmp_path / "fashion_mnist" / "test.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="test.npz is not a readable .npz"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="download is off"):
        load_dataset("svhn", "train", data_dir=tmp_path, download=False)


def test_unknown_names_are_refused():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", "validation")


def test_cifar10_archive_format(tmp_path, rng):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    batches = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}
            batches[name] = batch
            payload = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (folder / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    x, y = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert x.shape == (3, 32, 32, 3)
    # CIFAR rows are channel-major: the first 1024 values are the red plane.
    np.testing.assert_array_equal(x[0, :, :, 0].reshape(-1), batches["test_batch"][b"data"][0, :1024])
    x_train, _ = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert len(x_train) == 15


def test_svhn_mat_format_maps_label_10_to_0(tmp_path, rng):
    import scipy.io

    folder = tmp_path / "svhn"
    folder.mkdir()
    images = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": images, "y": np.array([[10], [1], [9], [10]])})
    x, y = load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    assert y.tolist() == [0, 1, 9, 0]
    np.testing.assert_array_equal(x[2], images[..., 2])


def test_class_balanced_indices():
    labels = np.repeat(np.arange(10), 7)
    idx = class_balanced_indices(labels, 3, 10, jax.random.PRNGKey(0))
    assert np.bincount(labels[idx]).tolist() == [3] * 10
    assert len(set(idx.tolist())) == 30
    np.testing.assert_array_equal(idx, class_balanced_indices(labels, 3, 10, jax.random.PRNGKey(0)))
    assert not np.array_equal(idx, class_balanced_indices(labels, 3, 10, jax.random.PRNGKey(1)))
    with pytest.raises(DataError, match="only 7 examples"):
        class_balanced_indices(labels, 8, 10, jax.random.PRNGKey(0))


def test_class_balanced_indices_are_those_of_jax_random_permutation_class_by_class():
    """The one-program sampler draws what the per-class ``jax.random.permutation`` calls drew (every seed and
    subset made before it stays the same); uneven class sizes, as real datasets have."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), [503, 611, 498, 577]))
    for seed in (0, 7):
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        expected = np.concatenate([np.flatnonzero(labels == c)[np.asarray(jax.random.permutation(keys[c], n))[:25]]
                                   for c, n in enumerate([503, 611, 498, 577])])
        np.testing.assert_array_equal(class_balanced_indices(labels, 25, 4, jax.random.PRNGKey(seed)), expected)
