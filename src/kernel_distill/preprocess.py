"""Preprocessing as the KIP papers did it, fitted on the training split and applied to any split.

1. Per-channel standardisation of ``x / 255`` with the training set's channel mean and std.
2. Optional ZCA whitening (KIP's ``zca_normalize``): every image, flattened, is first layer-normalised
   (its own mean removed, then scaled to norm ``sqrt(d)``), then multiplied by
   ``W = U diag((s + zca_reg * trace(C) / d)^-1/2) U^T`` where ``C = X^T X / n = U diag(s) U^T`` is the
   feature covariance of the (layer-normalised) training images.

Labels become mean-centred one-hot vectors, ``one_hot(y) - 1 / num_classes``.

The fitted :class:`Preprocessor` is stored with every distilled set (see :mod:`kernel_distill.io`) so test
data is mapped exactly the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kernel_distill.errors import KernelDistillError


@dataclasses.dataclass(frozen=True)
class ZcaRecipe:
    """How a ZCA matrix was fitted, to recompute it instead of storing it (a 3072 x 3072 float32 matrix is
    38 MB, the recipe a few bytes): :func:`fit_preprocessor` with ``zca_reg`` and ``layer_norm`` on the
    training split of ``dataset`` whose :func:`kernel_distill.checksums.split_checksum` is
    ``train_checksum``, less the ``val_size`` class-balanced validation images
    (:func:`kernel_distill.data.validation_split`). ``rank``: the number of eigen-directions kept; only the
    full rank ``d`` (ZCA as KIP does it) is made today. Recomputed by :mod:`kernel_distill.zca_recipes`."""

    dataset: str
    train_checksum: str
    val_size: int
    zca_reg: float
    layer_norm: bool
    rank: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: object, source: str = "zca_recipe") -> "ZcaRecipe":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict) or sorted(values) != sorted(names):
            raise KernelDistillError(f"{source} must be a JSON object with the fields {', '.join(names)}, got "
                                     f"{values!r}")
        checks = dict(dataset=lambda v: isinstance(v, str) and v != "",
                      train_checksum=lambda v: isinstance(v, str) and v != "",
                      val_size=lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                      zca_reg=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                      layer_norm=lambda v: isinstance(v, bool),
                      rank=lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        for name, check in checks.items():
            if not check(values[name]):
                raise KernelDistillError(f"{source}: field '{name}' has a bad value {values[name]!r}")
        return cls(**{**values, "zca_reg": float(values["zca_reg"])})


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
    """A fitted input transform.

    Attributes:
      mean: float32 ``(C,)`` channel means of ``x / 255`` on the training set.
      std: float32 ``(C,)`` channel standard deviations of ``x / 255``.
      zca_matrix: float32 ``(d, d)`` with ``d = H * W * C``, or ``None`` without ZCA.
      zca_layer_norm: whether images are layer-normalised before the ZCA matrix (KIP did).
      zca_recipe: how ``zca_matrix`` was fitted, when it is known; a file written with it stores the recipe
        instead of the matrix (:func:`kernel_distill.io.save_distilled`).
    """

    mean: np.ndarray
    std: np.ndarray
    zca_matrix: np.ndarray | None = None
    zca_layer_norm: bool = True
    zca_recipe: ZcaRecipe | None = None

    @property
    def uses_zca(self) -> bool:
        return self.zca_matrix is not None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Map images to the kernel's input space.

        Args:
          x: ``(n, H, W, C)`` uint8 pixels (0..255) or floats on the same 0..255 scale.
        Returns:
          float32 ``(n, H, W, C)``.
        """
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != self.mean.shape[0]:
            raise KernelDistillError(
                f"expected NHWC images with {self.mean.shape[0]} channel(s), got shape {x.shape}")
        z = (x.astype(np.float32) / 255.0 - self.mean) / self.std
        if self.zca_matrix is not None:
            flat = z.reshape(len(z), -1)
            if flat.shape[1] != self.zca_matrix.shape[0]:
                raise KernelDistillError(
                    f"the ZCA matrix is for {self.zca_matrix.shape[0]} features, images have {flat.shape[1]}")
            if self.zca_layer_norm:
                flat = _layer_norm(flat)
            z = (flat @ self.zca_matrix).reshape(z.shape).astype(np.float32)
        return z.astype(np.float32)

    def to_viewable(self, z: np.ndarray) -> np.ndarray:
        """Approximately invert :meth:`apply` for display: float32 ``(n, H, W, C)`` in ``[0, 1]``.

        ZCA is undone with the inverse matrix; layer normalisation cannot be undone, so ZCA'd images are
        rescaled per image to the training range instead.
        """
        z = np.asarray(z, dtype=np.float32)
        if self.zca_matrix is not None:
            flat = z.reshape(len(z), -1) @ np.linalg.pinv(self.zca_matrix.astype(np.float64)).astype(np.float32)
            z = flat.reshape(z.shape)
        x = z * self.std + self.mean
        if self.zca_matrix is not None and self.zca_layer_norm:
            lo = x.min(axis=(1, 2, 3), keepdims=True)
            hi = x.max(axis=(1, 2, 3), keepdims=True)
            x = (x - lo) / np.maximum(hi - lo, 1e-8)
        return np.clip(x, 0.0, 1.0)


def _layer_norm(flat: np.ndarray) -> np.ndarray:
    """Per-row: remove the mean, scale to norm sqrt(d). ``(n, d) -> (n, d)``."""
    centred = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-12) * np.sqrt(flat.shape[1])


def fit_preprocessor(x_train: np.ndarray, zca: bool = False, zca_reg: float = 0.1,
                     zca_layer_norm: bool = True) -> Preprocessor:
    """Fit the transform on training images.

    Args:
      x_train: uint8 ``(n, H, W, C)``.
      zca: add ZCA whitening.
      zca_reg: ZCA regulariser, relative: ``zca_reg * trace(C) / d`` is added to the eigenvalues.
      zca_layer_norm: layer-normalise images before ZCA (KIP's ``zca_normalize``).
    Returns:
      A :class:`Preprocessor`.
    """
    x_train = np.asarray(x_train)
    if x_train.ndim != 4 or len(x_train) < 2:
        raise KernelDistillError(f"fit_preprocessor needs at least 2 NHWC images, got shape {x_train.shape}")
    if zca_reg < 0 or not np.isfinite(zca_reg):
        raise KernelDistillError(f"zca_reg must be a non-negative number, got {zca_reg}")
    scaled = x_train.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 1, 2))
    std = scaled.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0)
    zca_matrix = None
    if zca:
        flat = ((scaled - mean) / std).reshape(len(scaled), -1)
        if zca_layer_norm:
            flat = _layer_norm(flat)
        cov = flat.T @ flat / len(flat)
        eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals = np.maximum(eigvals, 0.0) + zca_reg * np.trace(cov) / cov.shape[0]
        if np.any(eigvals <= 0):
            raise KernelDistillError("the ZCA covariance is singular; use zca_reg > 0")
        zca_matrix = (eigvecs * eigvals**-0.5) @ eigvecs.T
        zca_matrix = zca_matrix.astype(np.float32)
    return Preprocessor(mean.astype(np.float32), std.astype(np.float32), zca_matrix, zca_layer_norm)


def centered_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean-centred one-hot labels. int ``(n,)`` -> float32 ``(n, num_classes)``, rows sum to 0."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise KernelDistillError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise KernelDistillError(f"labels must lie in [0, {num_classes})")
    return (np.eye(num_classes, dtype=np.float32)[labels] - 1.0 / num_classes).astype(np.float32)
