"""The distilled-set file (``.npz``), documented in ``docs/FORMAT.md``.

Atomic writes live in :mod:`kernel_distill.atomic` (re-exported here for existing callers).

Arrays in a kernel-distill file:

* ``images``: float32 ``(n, H, W, C)`` in the preprocessed space (what the kernel sees).
* ``labels``: float32 ``(n, num_classes)``.
* ``preprocess_mean``, ``preprocess_std``: float32 ``(C,)``, applied to ``x / 255``.
* ``zca_matrix``: float32 ``(d, d)``, present only when ZCA whitening was used.
* ``metadata``: a JSON string (dataset, kernel spec, reg, method, step, metrics, package version, ...).

Files released with the KIP papers hold only ``images`` and ``labels``; they load with
``preprocessor=None`` and empty metadata, and the caller says how the test data must be mapped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

from kernel_distill.atomic import atomic_savez, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from kernel_distill.errors import KernelDistillError
from kernel_distill.preprocess import Preprocessor

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledSet:
    """A distilled (or natural) support set with everything needed to use it.

    Attributes:
      images: float32 ``(n, H, W, C)``, preprocessed.
      labels: float32 ``(n, num_classes)``.
      preprocessor: how raw pixels map into the images' space; ``None`` for a released KIP file.
      metadata: free-form JSON-able dict.
    """

    images: np.ndarray
    labels: np.ndarray
    preprocessor: Preprocessor | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _validate(self.images, self.labels, "distilled set")

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])


def _validate(images, labels, source: str):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4:
        raise KernelDistillError(f"{source}: 'images' must be NHWC (n, H, W, C), got shape {images.shape}")
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise KernelDistillError(
            f"{source}: 'labels' must be (n, num_classes) with n = {images.shape[0]}, got shape {labels.shape}")
    for name, arr in (("images", images), ("labels", labels)):
        if not np.issubdtype(arr.dtype, np.floating):
            raise KernelDistillError(f"{source}: '{name}' must be floating point, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise KernelDistillError(f"{source}: '{name}' contains NaN or inf")


def save_distilled(path: str | os.PathLike, distilled: DistilledSet) -> pathlib.Path:
    """Write a :class:`DistilledSet` atomically. Returns the path."""
    from kernel_distill import __version__

    metadata = dict(distilled.metadata)
    metadata.setdefault("format_version", FORMAT_VERSION)
    metadata.setdefault("package_version", __version__)
    arrays = dict(images=np.asarray(distilled.images, np.float32), labels=np.asarray(distilled.labels, np.float32))
    pre = distilled.preprocessor
    if pre is not None:
        arrays["preprocess_mean"] = np.asarray(pre.mean, np.float32)
        arrays["preprocess_std"] = np.asarray(pre.std, np.float32)
        metadata["zca_layer_norm"] = bool(pre.zca_layer_norm)
        if pre.zca_matrix is not None:
            arrays["zca_matrix"] = np.asarray(pre.zca_matrix, np.float32)
    try:
        arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    except TypeError as e:
        raise KernelDistillError(f"metadata is not JSON-serialisable: {e}") from None
    return atomic_savez(path, **arrays)


def load_distilled(path: str | os.PathLike) -> DistilledSet:
    """Read a kernel-distill file, or a released KIP file (arrays ``images`` and ``labels`` only).

    Raises :class:`KernelDistillError` naming the file for anything unreadable or malformed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise KernelDistillError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            contents = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise KernelDistillError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("images", "labels") if k not in contents]
    if missing:
        raise KernelDistillError(f"{path}: missing array(s) {', '.join(missing)}; found {sorted(contents)}")
    images, labels = contents["images"], contents["labels"]
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        raise KernelDistillError(f"{path}: 'labels' are integer class ids; expected (n, num_classes) floats")
    _validate(images, labels, str(path))
    metadata = {}
    if "metadata" in contents:
        try:
            metadata = json.loads(str(contents["metadata"]))
        except json.JSONDecodeError as e:
            raise KernelDistillError(f"{path}: 'metadata' is not valid JSON ({e})") from None
    preprocessor = None
    if "preprocess_mean" in contents and "preprocess_std" in contents:
        preprocessor = Preprocessor(
            mean=contents["preprocess_mean"].astype(np.float32),
            std=contents["preprocess_std"].astype(np.float32),
            zca_matrix=contents["zca_matrix"].astype(np.float32) if "zca_matrix" in contents else None,
            zca_layer_norm=bool(metadata.get("zca_layer_norm", True)),
        )
        if preprocessor.mean.shape != (images.shape[-1],) or preprocessor.std.shape != (images.shape[-1],):
            raise KernelDistillError(f"{path}: preprocess_mean/std must have one value per image channel")
    return DistilledSet(images.astype(np.float32), labels.astype(np.float32), preprocessor, metadata)
