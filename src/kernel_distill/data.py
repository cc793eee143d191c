"""Datasets: find, download, verify and load them as ``uint8`` NHWC images with integer labels.

Where a dataset is looked for, in order, inside ``<data_dir>/<name>/``:

1. ``train.npz`` / ``test.npz`` with arrays ``x`` (uint8, NHWC) and ``y`` (integer labels): the layout of
   the project's shared data folder, and the cache this module writes after parsing original files.
   ``cifar10`` is also found as ``<data_dir>/cifar10_jpeg_lossy/``, with a warning that it is lossy.
2. The original distribution files: MNIST / Fashion-MNIST IDX ``.gz`` files, CIFAR ``python.tar.gz``
   archives, SVHN ``.mat`` files.
3. If neither is there (and ``download=True``), the original files are downloaded from their canonical
   URLs with pooch (:func:`fetch`), checked against their published MD5 checksums, then parsed as in 2.

``data_dir`` is the argument, else the ``KERNEL_DISTILL_DATA`` environment variable, else
``~/.cache/kernel_distill``. ``KERNEL_DISTILL_MIRROR`` replaces the base URL of every download (a local
mirror). ``digits`` (scikit-learn's bundled 8x8 digits) needs no files and is the built-in default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import os
import pathlib
import pickle
import tarfile
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np
import numpy.typing as npt

from kernel_distill.atomic import atomic_write_bytes, current_umask
from kernel_distill.checksums import split_checksum
from kernel_distill.errors import DataError
from kernel_distill.preprocess import Preprocessor, ZcaRecipe, fit_preprocessor

if TYPE_CHECKING:
    import jax

SPLITS = ("train", "test")
DATA_DIR_ENV = "KERNEL_DISTILL_DATA"
MIRROR_ENV = "KERNEL_DISTILL_MIRROR"
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/kernel_distill")


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One original distribution file: where it is published and its MD5 checksum."""

    filename: str
    url: str
    md5: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What kernel-distill knows of a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    files: dict[str, tuple[RemoteFile, ...]]  # split -> its original files
    description: str = ""
    lossy_alias: str | None = None  # another folder name under which a lossy copy may be found


def _idx_files(base: str, md5s: dict[str, str]) -> dict[str, tuple[RemoteFile, ...]]:
    def rf(name: str) -> RemoteFile:
        return RemoteFile(name, base + name, md5s[name])

    return {
        "train": (rf("train-images-idx3-ubyte.gz"), rf("train-labels-idx1-ubyte.gz")),
        "test": (rf("t10k-images-idx3-ubyte.gz"), rf("t10k-labels-idx1-ubyte.gz")),
    }


_DIGITS = tuple(str(i) for i in range(10))
_CIFAR10_TAR = RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          "c58f30108f718f92721af3b95e74349a")
_CIFAR100_TAR = RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                           "eb9058c3a382ffc7106e4002c42a8d85")

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", 10, (8, 8, 1), _DIGITS, {},
        "scikit-learn's bundled 8x8 handwritten digits (1,797 images), split 80/20 per class, seeded; "
        "needs no files"),
    "mnist": DatasetInfo(
        "mnist", 10, (28, 28, 1), _DIGITS,
        _idx_files("https://ossci-datasets.s3.amazonaws.com/mnist/", {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        }),
        "MNIST handwritten digits, 60,000 train / 10,000 test, 28x28 grey"),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"),
        _idx_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        }),
        "Fashion-MNIST (Zalando), 60,000 train / 10,000 test, 28x28 grey"),
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        {"train": (_CIFAR10_TAR,), "test": (_CIFAR10_TAR,)},
        "CIFAR-10, 50,000 train / 10,000 test, 32x32 colour", lossy_alias="cifar10_jpeg_lossy"),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), tuple(str(i) for i in range(100)),
        {"train": (_CIFAR100_TAR,), "test": (_CIFAR100_TAR,)},
        "CIFAR-100 (fine labels), 50,000 train / 10,000 test, 32x32 colour"),
    "svhn": DatasetInfo(
        "svhn", 10, (32, 32, 3), _DIGITS,
        {"train": (RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                              "e26dedcc434d2e4c54c9b2d4a06d8373"),),
         "test": (RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                             "eb5a983be6a315427106f1b164d9cef3"),)},
        "SVHN cropped digits, 73,257 train / 26,032 test, 32x32 colour (label 10 mapped to 0)"),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``, or a :class:`DataError` listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: the argument, else ``$KERNEL_DISTILL_DATA``, else ``~/.cache/kernel_distill``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return pathlib.Path(data_dir).expanduser()


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = True, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a dataset.

    Args:
      name: one of :data:`DATASETS` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
        ``svhn``).
      split: ``"train"`` or ``"test"``.
      data_dir: where to look (see module docstring).
      download: fetch the original files when nothing is found locally.
      progress: show a progress bar while downloading.
    Returns:
      ``x``: uint8 ``(n, H, W, C)``; ``y``: int64 ``(n,)`` with values in ``[0, num_classes)``.
    Raises:
      DataError: unknown name or split, files missing and download off or failed, corrupt files.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if name == "digits":
        return _check_arrays(*_load_digits(split), info, "scikit-learn digits")

    root = resolve_data_dir(data_dir)
    folder = root / name
    npz = folder / f"{split}.npz"
    if npz.exists() and not npz.is_file():
        raise DataError(f"{npz} is a folder, not an .npz file: move it away or replace it with the {name} {split} "
                        f"split (arrays x and y)")
    if npz.is_file():
        return _check_arrays(*_read_npz(npz), info, str(npz))
    if info.lossy_alias:
        lossy = root / info.lossy_alias / f"{split}.npz"
        if lossy.is_file():
            warnings.warn(f"{name}: using the LOSSY copy {lossy} (JPEG-compressed pixels); accuracies on it are "
                          f"not comparable with published {name} numbers", stacklevel=2)
            return _check_arrays(*_read_npz(lossy), info, str(lossy))

    originals = info.files[split]
    missing = [f for f in originals if not (folder / f.filename).is_file()]
    if missing:
        if not download:
            raise DataError(
                f"{name} {split} not found in {folder}: expected {split}.npz or "
                f"{', '.join(f.filename for f in originals)} (download is off)")
        for remote in missing:
            download_file(remote, folder, progress=progress)
    x, y = _PARSERS[name](folder, split, originals)
    x, y = _check_arrays(x, y, info, str(folder))
    _try_cache(npz, x, y)
    return x, y


def available_datasets(data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """What :func:`load_dataset` would find for each dataset without downloading, one dict per name.

    ``.npz`` splits are checked for readability (their zip checksums and the arrays ``x`` and ``y``), so a
    corrupt file shows as such here rather than in the middle of a run.
    """
    root = resolve_data_dir(data_dir)
    rows: list[dict[str, str]] = []
    for name, info in DATASETS.items():
        if name == "digits":
            where, status = "scikit-learn (bundled)", "ready"
        else:
            folder = root / name
            problems = [p for p in (_npz_problem(folder / f"{s}.npz") for s in SPLITS) if p]
            if problems:
                rows.append(dict(name=name, status=f"UNREADABLE: {problems[0]}", location=str(folder),
                                 description=info.description))
                continue
            npz_ok = all((folder / f"{s}.npz").is_file() for s in SPLITS)
            originals_ok = all((folder / f.filename).is_file() for s in SPLITS for f in info.files[s])
            alias = info.lossy_alias
            lossy = alias is not None and all((root / alias / f"{s}.npz").is_file() for s in SPLITS)
            if npz_ok:
                where, status = str(folder), "ready (npz)"
            elif originals_ok:
                where, status = str(folder), "ready (original files)"
            elif lossy and alias is not None:
                where, status = str(root / alias), "ready (LOSSY JPEG copy)"
            else:
                where, status = str(folder), "missing (downloads on first use)"
        rows.append(dict(name=name, status=status, location=where, description=info.description))
    return rows


def _npz_problem(path: pathlib.Path) -> str | None:
    """Why ``path`` is not a readable split file (``None`` if it is fine or absent), without loading it."""
    import zipfile

    if not path.exists():
        return None
    if not path.is_file():
        return f"{path.name} is a folder"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"{path.name} is not a readable .npz ({type(e).__name__})"
    if bad is not None:
        return f"{path.name} is corrupt (member {bad} fails its checksum)"
    if not {"x.npy", "y.npy"} <= names:
        return f"{path.name} lacks the arrays x and y"
    return None


def check_data_dir_exists(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory, refusing one that was named (argument or ``$KERNEL_DISTILL_DATA``) but does not
    exist: a typo must not read as "every dataset missing"."""
    root = resolve_data_dir(data_dir)
    named = data_dir is not None or os.environ.get(DATA_DIR_ENV)
    if named and not root.is_dir():
        source = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise DataError(f"{source}: {root} is not a folder" if root.exists() else
                        f"{source}: the data folder {root} does not exist")
    return root


# ----------------------------------------------------------------------------------------------------
# Downloads.


def _source_url(remote: RemoteFile) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + remote.filename
    return remote.url


def fetch(url: str, known_hash: str, folder: pathlib.Path, filename: str, progress: bool = True,
          timeout_s: float = 60.0) -> pathlib.Path:
    """Download ``url`` to ``folder/filename`` through pooch, verify ``known_hash`` (``"md5:..."`` or
    ``"sha256:..."``), and only then move it into place; a file already there with that hash is kept.

    The one download mechanism of the package (datasets and zoo sets). A failed, interrupted, truncated or
    mismatching download leaves nothing behind in ``folder``; the failure is a :class:`DataError` naming the
    URL and where to put the file by hand.
    """
    import pooch
    import requests

    target = folder / filename
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {folder}: {e}. Set {DATA_DIR_ENV} to a writable "
                        f"folder") from None
    pooch.get_logger().setLevel("WARNING")  # its "Downloading ..." lines would duplicate the progress bar
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout_s,
                                      headers={"User-Agent": "kernel-distill"})
    try:
        try:
            path = pooch.retrieve(url, known_hash=known_hash, fname=filename, path=folder, downloader=downloader)
        except BaseException:
            if created:  # a failed first download leaves no empty dataset folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    except ValueError as e:  # pooch's hash mismatch (the temporary file is already deleted)
        if "hash" not in str(e):
            raise
        algorithm = known_hash.split(":", 1)[0].upper()
        raise DataError(f"checksum mismatch for {filename} downloaded from {url}: {algorithm} differs from the "
                        f"expected {known_hash.split(':', 1)[1]}; the file was discarded") from None
    except (requests.exceptions.RequestException, OSError) as e:
        raise DataError(f"download of {url} failed ({e}). Download it by hand and put it at {target}, or set "
                        f"{DATA_DIR_ENV} to a folder that holds it") from None
    os.chmod(path, 0o666 & ~current_umask())  # a download is a normal file, not a temporary file's 0600
    return pathlib.Path(path)


def download_file(remote: RemoteFile, folder: pathlib.Path, progress: bool = True,
                  timeout_s: float = 60.0) -> pathlib.Path:
    """Download an original distribution file into ``folder`` against its published MD5 (:func:`fetch`)."""
    return fetch(_source_url(remote), f"md5:{remote.md5}", folder, remote.filename, progress, timeout_s)


# ----------------------------------------------------------------------------------------------------
# Parsers of the original formats.


def _read_npz(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays 'x' and 'y'; it holds {sorted(f.files)}")
            return f["x"], f["y"]
    except DataError:
        raise
    except Exception as e:  # bad zip, bad zlib stream (zlib.error), truncated member, object array, ...
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); delete or replace it") \
            from None


def _read_idx(path: pathlib.Path, expected_ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST format): magic, dimensions, then unsigned bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is truncated or not a gzip file ({e}); delete it and download again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise DataError(f"{path} has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DataError(f"{path} holds {len(raw) - header} data bytes, its header promises {size}; "
                        f"the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _parse_idx_pair(folder: pathlib.Path, split: str,
                    files: tuple[RemoteFile, ...]) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = files
    x = _read_idx(folder / images_file.filename, 3)[..., None]
    y = _read_idx(folder / labels_file.filename, 1)
    return x, y


def _cifar_members(folder: pathlib.Path, archive: RemoteFile) -> dict[str, dict]:
    path = folder / archive.filename
    out: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                if f is None:  # a regular file always has its bytes; tarfile types it as optional
                    continue
                # The CIFAR archives are Python pickles of plain dicts of bytes and lists; they are only
                # read after their MD5 matched the published one, or from a file the user placed.
                out[pathlib.PurePosixPath(member.name).name] = pickle.load(f, encoding="bytes")
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise DataError(f"{path} is truncated or not a CIFAR python archive ({e}); delete it and download "
                        f"again") from None
    return out


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _parse_cifar10(folder: pathlib.Path, split: str, files: tuple[RemoteFile, ...]) -> tuple[np.ndarray, np.ndarray]:
    members = _cifar_members(folder, files[0])
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if n not in members]
    if missing:
        raise DataError(f"{folder / files[0].filename} lacks {', '.join(missing)}")
    return _cifar_arrays([members[n] for n in names], b"labels")


def _parse_cifar100(folder: pathlib.Path, split: str, files: tuple[RemoteFile, ...]) -> tuple[np.ndarray, np.ndarray]:
    members = _cifar_members(folder, files[0])
    if split not in members:
        raise DataError(f"{folder / files[0].filename} lacks the '{split}' member")
    return _cifar_arrays([members[split]], b"fine_labels")


def _parse_svhn(folder: pathlib.Path, split: str, files: tuple[RemoteFile, ...]) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    path = folder / files[0].filename
    try:
        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)
        y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except Exception as e:  # scipy raises many types for a bad .mat file
        raise DataError(f"{path} is truncated or not an SVHN .mat file ({e}); delete it and download again") \
            from None
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return x, y


_PARSERS: dict[str, Callable[[pathlib.Path, str, tuple[RemoteFile, ...]], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _parse_idx_pair,
    "fashion_mnist": _parse_idx_pair,
    "cifar10": _parse_cifar10,
    "cifar100": _parse_cifar100,
    "svhn": _parse_svhn,
}


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    # 20% of every class goes to test; the legacy RandomState stream is frozen across NumPy versions.
    rng = np.random.RandomState(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(0.2 * len(idx)))]] = True
    keep = test if split == "test" else ~test
    return x[keep], y[keep]


def _check_arrays(x: npt.ArrayLike, y: npt.ArrayLike, info: DatasetInfo,
                  source: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{source}: images must be uint8 NHWC, got dtype {x.dtype} and shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{source}: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[1:] != info.image_shape:
        raise DataError(f"{source}: images of shape {x.shape[1:]}, expected {info.image_shape} for {info.name}")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= info.num_classes)):
        raise DataError(f"{source}: labels must be integers in [0, {info.num_classes})")
    return x, y.astype(np.int64)


def _try_cache(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> None:
    """Save parsed arrays as ``<split>.npz`` for fast loading next time; skip quietly if read-only."""
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass


def class_balanced_indices(labels: npt.ArrayLike, per_class: int, num_classes: int,
                           key: jax.Array) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, drawn without replacement with a ``jax.random`` key.

    Returns an int array ``(per_class * num_classes,)`` ordered class by class.
    """
    import jax

    labels = np.asarray(labels)
    if per_class < 1:
        raise DataError(f"per-class count must be at least 1, got {per_class}")
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for c, idx in enumerate(by_class):
        if len(idx) < per_class:
            raise DataError(f"class {c} has only {len(idx)} examples, fewer than the {per_class} asked for")
    keys = jax.random.split(key, num_classes)
    perms = _class_permutations()(keys, tuple(len(idx) for idx in by_class))
    return np.concatenate([idx[np.asarray(perm)[:per_class]] for idx, perm in zip(by_class, perms)])


@functools.lru_cache(maxsize=1)
def _class_permutations():
    """``jax.random.permutation(keys[c], counts[c])`` for every class, as one compiled program.

    The same permutations (the same operations; tested against ``jax.random.permutation``), but one
    compilation per set of class sizes instead of one per class, and on a CPU without XLA's optimisation
    passes, which do not change integer results: MNIST's ten classes took 7.5 s to compile class by class,
    3.1 s this way (2026-12-07, 2-core CPU beside two other jobs; the first command on a dataset pays it
    once, as every command samples)."""
    import jax

    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} \
        if jax.default_backend() == "cpu" else None

    @functools.partial(jax.jit, static_argnums=1, compiler_options=options)
    def permutations(keys, counts):
        return [jax.random.permutation(keys[c], n) for c, n in enumerate(counts)]

    return permutations


def natural_subset(x: np.ndarray, y: np.ndarray, per_class: int, num_classes: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded class-balanced subset of ``(x, y)``: ``class_balanced_indices`` with ``PRNGKey(seed)``.

    Returns ``(x[idx], y[idx])``, ordered class by class.
    """
    import jax

    idx = class_balanced_indices(y, per_class, num_classes, jax.random.PRNGKey(seed))
    return x[idx], y[idx]


# ----------------------------------------------------------------------------------------------------
# A dataset mapped into the kernel's input space.


VALIDATION_SEED = 1234  # the validation split does not depend on a run's seed: runs with other seeds share it


def default_val_size(name: str) -> int:
    """Validation images held out of the training split by default: 20 per class on ``digits`` (of ~144),
    otherwise 5,000 (about 10% of MNIST / CIFAR-10's training sets, 50 per class on CIFAR-100)."""
    return 20 * dataset_info(name).num_classes if name == "digits" else 5000


def validation_split(y: np.ndarray, val_size: int, num_classes: int,
                     seed: int = VALIDATION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train_idx, val_idx)`` splitting ``y`` into the rest and a class-balanced validation set.

    ``val_size`` must be a multiple of ``num_classes``; both index arrays are sorted, and disjoint.
    """
    import jax

    if val_size < 0 or val_size % num_classes:
        raise DataError(f"the validation size must be a non-negative multiple of {num_classes} (class-balanced), "
                        f"got {val_size}")
    if val_size == 0:
        return np.arange(len(y)), np.zeros(0, np.int64)
    counts = np.bincount(y, minlength=num_classes)
    if val_size // num_classes >= counts.min():
        raise DataError(f"a validation set of {val_size} takes {val_size // num_classes} images per class; the "
                        f"smallest class has {counts.min()} training images: use a smaller --val-size")
    val_idx = np.sort(class_balanced_indices(y, val_size // num_classes, num_classes, jax.random.PRNGKey(seed)))
    keep = np.ones(len(y), bool)
    keep[val_idx] = False
    return np.flatnonzero(keep), val_idx


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData:
    """A dataset loaded and mapped into the kernel's input space.

    ``x_train``/``x_val``/``x_test``: float32 NHWC (preprocessed); ``y_*``: int labels. The validation
    split is held out of the training split (``x_train`` does not contain it; it may be empty).
    ``raw_train``: the uint8 training images (to draw natural supports from). ``checksums``: per split
    of the files as loaded (before any split or limit), see :func:`kernel_distill.checksums.split_checksum`.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    preprocessor: Preprocessor
    raw_train: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x_val is None:
            object.__setattr__(self, "x_val", np.zeros((0, *self.x_train.shape[1:]), np.float32))
            object.__setattr__(self, "y_val", np.zeros(0, np.int64))

    @property
    def num_val(self) -> int:
        assert self.y_val is not None  # __post_init__ replaces None with an empty split
        return len(self.y_val)


def limit_test(x: np.ndarray, y: np.ndarray, test_limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The test images a ``test_limit`` keeps: the first ``test_limit``, except when the split is stored
    sorted by class (the lossy CIFAR-10 copy), where the first images would hold only the first classes;
    there it keeps ``test_limit`` images drawn with a fixed seed, in their stored order."""
    if not test_limit or test_limit >= len(y):
        return x, y
    labels = np.asarray(y)
    if len(labels) > 1 and np.all(np.diff(labels.astype(np.int64)) >= 0):
        keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:test_limit])
        return x[keep], y[keep]
    return x[:test_limit], y[:test_limit]


def prepare_dataset(name: str, data_dir: str | os.PathLike | None = None, zca: bool = False, zca_reg: float = 0.1,
                    test_limit: int | None = None, progress: bool = True, val_size: int = 0,
                    preprocessor: Preprocessor | None = None) -> PreparedData:
    """Load both splits of ``name``, hold out ``val_size`` class-balanced validation images from the training
    split (:func:`validation_split`), fit the preprocessing on the rest of train, and apply it to all three.

    ``preprocessor``: use this one (a distilled file's own) instead of fitting one; ``zca`` is then ignored.
    """
    info = dataset_info(name)
    raw_train, y_train = load_dataset(name, "train", data_dir, progress=progress)
    raw_test, y_test = load_dataset(name, "test", data_dir, progress=progress)
    checksums = dict(train=split_checksum(raw_train, y_train), test=split_checksum(raw_test, y_test))
    if test_limit:
        raw_test, y_test = limit_test(raw_test, y_test, test_limit)
    train_idx, val_idx = validation_split(y_train, val_size, info.num_classes)
    raw_val, y_val = raw_train[val_idx], y_train[val_idx]
    raw_train, y_train = raw_train[train_idx], y_train[train_idx]
    if preprocessor is not None:
        pre = preprocessor
    else:
        pre = fit_preprocessor(raw_train, zca=zca, zca_reg=zca_reg)
        if zca:  # how the matrix was fitted, so a file can store this instead of it (zca_recipes)
            pre = dataclasses.replace(pre, zca_recipe=ZcaRecipe(
                dataset=name, train_checksum=checksums["train"], val_size=int(val_size), zca_reg=float(zca_reg),
                layer_norm=pre.zca_layer_norm, rank=int(np.prod(raw_train.shape[1:]))))
    return PreparedData(name, info.num_classes, info.class_names, pre, raw_train, pre.apply(raw_train), y_train,
                        pre.apply(raw_test), y_test, pre.apply(raw_val) if len(raw_val) else None,
                        y_val if len(raw_val) else None, checksums)
