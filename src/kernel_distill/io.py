"""The distilled-set file (``.npz``), documented in ``docs/FORMAT.md``.

Atomic writes live in :mod:`kernel_distill.atomic` (re-exported here for existing callers).

Arrays in a kernel-distill file:

* ``images``: float32 ``(n, H, W, C)`` in the preprocessed space (what the kernel sees).
* ``labels``: float32 ``(n, num_classes)``.
* ``preprocess_mean``, ``preprocess_std``: float32 ``(C,)``, applied to ``x / 255``.
* ``zca_matrix``: float32 ``(d, d)``, present when ZCA whitening was used, unless the file stores the
  metadata's ``zca_recipe`` instead (format version 3): the matrix is then recomputed from the training
  data on first use and cached (:mod:`kernel_distill.zca_recipes`).
* ``metadata``: a JSON string (dataset, kernel spec, reg, method, step, metrics, package version, ...).

Files released with the KIP papers hold only ``images`` and ``labels``; they load with
``preprocessor=None`` and empty metadata, and the caller says how the test data must be mapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np

from kernel_distill.atomic import atomic_savez, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels.spec import KernelSpec
from kernel_distill.preprocess import Preprocessor, ZcaRecipe

# 2: metadata records the architecture's layer list (`kernel_layers`) beside the `kernel` spec, and a
# `kernel` spec must hold exactly KernelSpec's fields. Version-1 files are read as before.
FORMAT_VERSION = 3  # the newest this version reads
# What a file states: 2 for every file a version-2 reader reads right; 3 only for a ZCA stored as its recipe,
# which an older reader must refuse rather than read as a file without ZCA.
_WRITTEN_VERSION = 2
_RECIPE_VERSION = 3


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

    def __post_init__(self) -> None:
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


def layer_names(spec: KernelSpec) -> list[str]:
    """The architecture's layers as names, e.g. ``["Conv", "Relu", ..., "Flatten", "Dense"]``."""
    return [type(layer).__name__ for layer in spec.layers]


def _check_format_version(metadata, path) -> None:
    version = metadata.get("format_version", 1) if isinstance(metadata, dict) else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KernelDistillError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise KernelDistillError(f"{path}: written in file format {version}, newer than this kernel-distill "
                                 f"reads ({FORMAT_VERSION}); upgrade kernel-distill")


def save_distilled(path: str | os.PathLike, distilled: DistilledSet, zca_as_recipe: bool = False,
                   image_dtype: str = "float32") -> pathlib.Path:
    """Write a :class:`DistilledSet` atomically. Returns the path.

    ``zca_as_recipe``: store the ZCA preprocessing as its recipe (``preprocessor.zca_recipe``, a few bytes)
    instead of the ``d x d`` matrix; readers recompute the matrix from the training data (format version 3).
    ``image_dtype``: ``"float32"``, or ``"float16"`` to halve a large set's bytes (the zoo's 50-per-class
    sets); readers always get float32, so a float16 file *is* its rounded images and is measured as such.
    """
    from kernel_distill import __version__

    if image_dtype not in ("float32", "float16"):
        raise KernelDistillError(f"image_dtype must be 'float32' or 'float16', got {image_dtype!r}")

    metadata = dict(distilled.metadata)
    pre = distilled.preprocessor
    recipe_only = zca_as_recipe and pre is not None and pre.zca_matrix is not None
    if recipe_only and (pre is None or pre.zca_recipe is None):
        raise KernelDistillError("this set's ZCA matrix has no recipe (how it was fitted): it can only be stored "
                                 "as the matrix")
    metadata["format_version"] = _RECIPE_VERSION if recipe_only else _WRITTEN_VERSION
    metadata.setdefault("package_version", __version__)
    if "kernel" in metadata:
        metadata["kernel_layers"] = layer_names(KernelSpec.from_dict(metadata["kernel"]))
    images = np.asarray(distilled.images, np.float32)
    if image_dtype == "float16" and np.abs(images).max() > np.finfo(np.float16).max:
        raise KernelDistillError("images exceed the float16 range: store them as float32")
    arrays = dict(images=images.astype(image_dtype), labels=np.asarray(distilled.labels, np.float32))
    if pre is not None:
        arrays["preprocess_mean"] = np.asarray(pre.mean, np.float32)
        arrays["preprocess_std"] = np.asarray(pre.std, np.float32)
        metadata["zca_layer_norm"] = bool(pre.zca_layer_norm)
        if pre.zca_matrix is not None and pre.zca_recipe is not None:
            metadata["zca_recipe"] = pre.zca_recipe.to_dict()
        if pre.zca_matrix is not None and not recipe_only:
            arrays["zca_matrix"] = np.asarray(pre.zca_matrix, np.float32)
    try:
        arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    except TypeError as e:
        raise KernelDistillError(f"metadata is not JSON-serialisable: {e}") from None
    return atomic_savez(path, **arrays)


# Metadata fields with a fixed type: name -> (check, what it must be). Unknown fields are kept as they are.
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_METADATA_FIELDS = {
    "format_version": (_is_int, "an integer"),
    "package_version": (lambda v: isinstance(v, str), "a string"),
    "dataset": (lambda v: isinstance(v, str) and v != "", "a dataset name"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "per_class": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "seed": (_is_int, "an integer"),
    "step": (_is_int, "an integer"),
    "kernel": (lambda v: isinstance(v, dict), "a JSON object (a kernel spec)"),
    "get": (lambda v: v in ("ntk", "nngp"), "'ntk' or 'nngp'"),
    "reg": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "ls_reg": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "learn_labels": (lambda v: isinstance(v, bool), "true or false"),
    "zca_layer_norm": (lambda v: isinstance(v, bool), "true or false"),
    "metrics": (lambda v: isinstance(v, dict), "a JSON object"),
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "zca_recipe": (lambda v: isinstance(v, dict), "a JSON object (a ZCA recipe)"),
}


def validate_metadata(metadata: object, source: str) -> dict:
    """Check the metadata of a distilled set: a JSON object whose known fields have the right types.

    Raises :class:`KernelDistillError` naming the field; the kernel spec is checked by building it.
    """
    if not isinstance(metadata, dict):
        raise KernelDistillError(f"{source}: 'metadata' must be a JSON object, got {type(metadata).__name__}")
    for name, (check, what) in _METADATA_FIELDS.items():
        if name in metadata and not check(metadata[name]):
            raise KernelDistillError(f"{source}: metadata field '{name}' must be {what}, got {metadata[name]!r}")
    if "kernel" in metadata:
        from kernel_distill.kernels.spec import KernelSpec

        try:
            KernelSpec.from_dict(metadata["kernel"])
        except KernelDistillError as e:
            raise KernelDistillError(f"{source}: metadata field 'kernel': {e}") from None
        except (TypeError, ValueError) as e:
            raise KernelDistillError(f"{source}: metadata field 'kernel' is not a valid kernel spec ({e})") from None
    return metadata


def _read_arrays(path: pathlib.Path) -> dict:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise KernelDistillError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"\x93NUMPY":
        raise KernelDistillError(f"{path}: a single .npy array, not an .npz archive of images and labels")
    if not magic.startswith(b"PK"):
        what = "empty" if not magic else "not a zip archive"
        raise KernelDistillError(f"{path}: not a readable .npz file (it is {what})")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except KernelDistillError:
        raise
    except Exception as e:  # bad zip, bad zlib stream, truncated member, object array, bad header...
        reason = str(e) or type(e).__name__
        raise KernelDistillError(f"{path}: not a readable .npz file ({type(e).__name__}: {reason})") from None


def load_distilled(path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> DistilledSet:
    """Read a kernel-distill file, or a released KIP file (arrays ``images`` and ``labels`` only).

    A file that stores its ZCA as a recipe gets its matrix from :func:`kernel_distill.zca_recipes.zca_matrix`
    (the training split of the recipe's dataset in ``data_dir`` is read once, then the matrix is cached).

    Raises :class:`KernelDistillError` naming the file for anything unreadable or malformed: a corrupted
    archive or compressed member, missing or mis-shaped arrays, NaN/inf, metadata that is not a JSON
    object or has a field of the wrong type, preprocessing arrays that do not fit the images.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise KernelDistillError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    contents = _read_arrays(path)
    missing = [k for k in ("images", "labels") if k not in contents]
    if missing:
        raise KernelDistillError(f"{path}: missing array(s) {', '.join(missing)}; found {sorted(contents)}")
    images, labels = contents["images"], contents["labels"]
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        raise KernelDistillError(f"{path}: 'labels' are integer class ids; expected (n, num_classes) floats")
    _validate(images, labels, str(path))
    if len(images) == 0:
        raise KernelDistillError(f"{path}: holds no images")
    metadata = {}
    if "metadata" in contents:
        raw = contents["metadata"]
        if raw.ndim != 0 or raw.dtype.kind != "U":
            raise KernelDistillError(f"{path}: 'metadata' must be a JSON string, got a {raw.dtype} array of shape "
                                     f"{raw.shape}")
        try:
            metadata = json.loads(str(raw))
        except json.JSONDecodeError as e:
            raise KernelDistillError(f"{path}: 'metadata' is not valid JSON ({e})") from None
        validate_metadata(metadata, str(path))
        _check_format_version(metadata, path)
    preprocessor = None
    if ("preprocess_mean" in contents) != ("preprocess_std" in contents):
        raise KernelDistillError(f"{path}: has only one of preprocess_mean and preprocess_std")
    if "preprocess_mean" in contents:
        preprocessor = _read_preprocessor(contents, images, metadata, path, data_dir, progress)
    elif "zca_matrix" in contents:
        raise KernelDistillError(f"{path}: has a zca_matrix but no preprocess_mean/std")
    return DistilledSet(images.astype(np.float32), labels.astype(np.float32), preprocessor, metadata)


def _read_preprocessor(contents: dict, images: np.ndarray, metadata: dict, path: pathlib.Path,
                       data_dir: str | os.PathLike | None = None, progress: bool = True) -> Preprocessor:
    channels, dim = images.shape[-1], int(np.prod(images.shape[1:]))
    arrays = {k: contents[k] for k in ("preprocess_mean", "preprocess_std", "zca_matrix") if k in contents}
    shapes = dict(preprocess_mean=(channels,), preprocess_std=(channels,), zca_matrix=(dim, dim))
    for name, arr in arrays.items():
        if arr.shape != shapes[name]:
            raise KernelDistillError(f"{path}: '{name}' must have shape {shapes[name]} for images of shape "
                                     f"{images.shape[1:]}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
            raise KernelDistillError(f"{path}: '{name}' must hold finite floats")
    if np.any(arrays["preprocess_std"] <= 0):
        raise KernelDistillError(f"{path}: 'preprocess_std' must be positive")
    mean, std = arrays["preprocess_mean"].astype(np.float32), arrays["preprocess_std"].astype(np.float32)
    recipe = ZcaRecipe.from_dict(metadata["zca_recipe"], f"{path}: zca_recipe") if "zca_recipe" in metadata else None
    matrix = arrays["zca_matrix"].astype(np.float32) if "zca_matrix" in arrays else None
    if recipe is not None and recipe.rank != dim:
        raise KernelDistillError(f"{path}: its zca_recipe has rank {recipe.rank} for images of {dim} features; only "
                                 f"full-rank ZCA (rank {dim}) is made by this version")
    if recipe is not None and matrix is None:
        from kernel_distill.zca_recipes import zca_matrix

        try:
            matrix = zca_matrix(recipe, mean, std, data_dir, progress)
        except KernelDistillError as e:
            raise KernelDistillError(f"{path}: stores its ZCA as a recipe, and {e}") from None
    return Preprocessor(mean=mean, std=std, zca_matrix=matrix, zca_recipe=recipe,
                        zca_layer_norm=bool(metadata.get("zca_layer_norm", True)))


def dataset_of(distilled: DistilledSet, source: str, requested: str | None) -> str:
    """The dataset a distilled set is used with: ``requested`` if given, else the one its metadata records.

    A set made on one dataset is refused with another (its images and preprocessing belong to the first);
    a file that records none (a released KIP file) needs ``requested``.
    """
    recorded = distilled.metadata.get("dataset")
    if requested is None:
        if not recorded:
            raise KernelDistillError(f"{source} does not say its dataset: add --dataset")
        return recorded
    if recorded and recorded != requested:
        raise KernelDistillError(f"{source} was made on {recorded}, not {requested}: its images and preprocessing "
                                 f"belong to {recorded} (use --dataset {recorded})")
    return requested


def check_preprocessing_request(distilled: DistilledSet, source: str, zca: bool) -> None:
    """A file's own preprocessing is always used; refuse a ``--zca`` that contradicts it."""
    pre = distilled.preprocessor
    if pre is not None and zca and not pre.uses_zca:
        raise KernelDistillError(f"--zca: {source} was preprocessed without ZCA and its own preprocessing is "
                                 f"used; drop --zca")
