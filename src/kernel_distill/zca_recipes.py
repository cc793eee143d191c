"""ZCA matrices from their recipes: recomputed from the training data on first use, then cached.

A distilled set whose preprocessing includes ZCA needs the ``d x d`` matrix its images were whitened with
(38 MB in float32 for CIFAR-10). A file may store the :class:`~kernel_distill.preprocess.ZcaRecipe` instead
(the zoo does): the dataset, the checksum of its training split, the validation images left out, the
regulariser and the rank. :func:`zca_matrix` refits the matrix exactly as the run did
(:func:`kernel_distill.preprocess.fit_preprocessor` on the same images), after checking that the training
split is the one the recipe names and that the refitted channel statistics are the file's, and caches it:

* in this process (a second load costs nothing);
* on disk as ``<cache>/zca-<key>.npy`` (``$KERNEL_DISTILL_CACHE``, else ``~/.cache/kernel_distill``), written
  atomically; ``key`` is the SHA-256 of the recipe, so another recipe never reads it. An unwritable cache
  folder only costs the refit next time.

Processes that need the same matrix at once (two ranking processes, Ray workers, test workers) refit it once:
the refit holds an exclusive lock on ``<cache>/zca-<key>.lock`` (``fcntl.flock``; released by the kernel if its
holder dies), and a process that waited for it reads the cache its holder wrote. With an unwritable cache
folder there is no lock (and no cache to share): each process refits, as before.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only, as the run folders' locks (runs.py)
import hashlib
import io
import json
import os
import pathlib
from typing import Iterator

import numpy as np

from kernel_distill.errors import KernelDistillError
from kernel_distill.preprocess import ZcaRecipe, fit_preprocessor

CACHE_ENV = "KERNEL_DISTILL_CACHE"
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "kernel_distill"

_MEMORY: dict[str, np.ndarray] = {}


def recipe_key(recipe: ZcaRecipe) -> str:
    """A name for the recipe's matrix: the SHA-256 of its fields as canonical JSON (first 24 hex digits)."""
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def recipe_for(dataset: str, train_checksum: str, val_size: int, zca_reg: float, dim: int,
               layer_norm: bool = True) -> ZcaRecipe:
    """The recipe of a full-rank ZCA fitted on ``dataset``'s training split less ``val_size`` images."""
    return ZcaRecipe(dataset=dataset, train_checksum=train_checksum, val_size=int(val_size), zca_reg=float(zca_reg),
                     layer_norm=bool(layer_norm), rank=int(dim))


def zca_matrix(recipe: ZcaRecipe, mean: np.ndarray, std: np.ndarray, data_dir: str | os.PathLike | None = None,
               progress: bool = True) -> np.ndarray:
    """The float32 ``(d, d)`` ZCA matrix of ``recipe``, from the caches or refitted.

    ``mean``/``std``: the file's channel statistics, float32 ``(C,)``; a refit whose statistics differ means
    the data is not the recipe's, and is refused. Raises :class:`KernelDistillError` with one line when the
    dataset is missing, its training split is not the recipe's, or the recipe asks for what is not made.
    """
    key = recipe_key(recipe)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / f"zca-{key}.npy"
    cached = _read_cache(path, recipe.rank)
    if cached is None:
        with _refit_lock(path.with_suffix(".lock")):
            cached = _read_cache(path, recipe.rank)  # written by a process this one waited for
            if cached is None:
                cached = _refit(recipe, mean, std, data_dir, progress)
                _write_cache(path, cached)
    _MEMORY[key] = cached
    return cached


@contextlib.contextmanager
def _refit_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while the block runs; nothing where the file cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError:  # a read-only cache folder: no lock, and no cache to share either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _refit(recipe: ZcaRecipe, mean: np.ndarray, std: np.ndarray, data_dir: str | os.PathLike | None,
           progress: bool) -> np.ndarray:
    from kernel_distill.checksums import split_checksum
    from kernel_distill.data import dataset_info, load_dataset, validation_split

    raw, labels = load_dataset(recipe.dataset, "train", data_dir, progress=progress)
    if split_checksum(raw, labels) != recipe.train_checksum:
        raise KernelDistillError(f"the ZCA recipe was fitted on a {recipe.dataset} training split with checksum "
                                 f"{recipe.train_checksum[:16]}..., and this one differs: its matrix cannot be "
                                 f"recomputed here")
    dim = int(np.prod(raw.shape[1:]))
    if recipe.rank != dim:
        raise KernelDistillError(f"the ZCA recipe keeps {recipe.rank} of {dim} directions; only full-rank ZCA "
                                 f"(rank {dim}) is made by this version")
    train_idx, _ = validation_split(labels, recipe.val_size, dataset_info(recipe.dataset).num_classes)
    fitted = fit_preprocessor(raw[train_idx], zca=True, zca_reg=recipe.zca_reg, zca_layer_norm=recipe.layer_norm)
    if not (np.allclose(fitted.mean, mean, rtol=1e-5, atol=1e-7) and np.allclose(fitted.std, std, rtol=1e-5,
                                                                                   atol=1e-7)):
        raise KernelDistillError(f"the ZCA recipe's images do not give the file's channel statistics (mean "
                                 f"{np.round(fitted.mean, 5).tolist()} vs {np.round(mean, 5).tolist()}): the "
                                 f"recipe does not describe this file")
    assert fitted.zca_matrix is not None
    return fitted.zca_matrix


def _read_cache(path: pathlib.Path, dim: int) -> np.ndarray | None:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if matrix.shape != (dim, dim) or matrix.dtype != np.float32 or not np.all(np.isfinite(matrix)):
        return None  # a stale or damaged cache file: refit and replace it
    return matrix


def _write_cache(path: pathlib.Path, matrix: np.ndarray) -> None:
    from kernel_distill.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, matrix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except (OSError, KernelDistillError):
        pass  # a read-only home: the next process refits
