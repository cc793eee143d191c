"""Distilled sets for PyTorch, JAX and Hugging Face users: safetensors, an image folder, and parquet.

Three formats, each written by :func:`export` and read back by :func:`read_export` (docs/INTEROP.md):

* ``safetensors`` (one file, no pickles; readable by ``safetensors.torch``, ``safetensors.numpy``,
  ``safetensors.flax``): the tensors ``images`` float32 ``(n, H, W, C)`` in the set's own input space (what the
  kernel saw), ``labels`` float32 ``(n, K)`` (the soft labels, centred: one-hot minus ``1/K`` for natural
  ones), ``hard_labels`` int64 ``(n,)`` (their argmax), ``preprocess_mean`` / ``preprocess_std`` float32
  ``(C,)`` (of ``x / 255``) and, for a ZCA set, ``zca_matrix`` float32 ``(d, d)``; the header's string
  metadata says the dataset, method, kernel, label centring, the transfer protocol's label scale, the
  command that made the set and the source file's sha256. Reading it back gives the set exactly.
* ``imagefolder`` (a folder): ``train/NN_CLASS/IIIII.png`` in pixel space (the preprocessing inverted; a
  ZCA set with per-image layer normalisation can only be inverted up to each image's offset and scale, and
  pixels outside ``[0, 1]`` are clipped: ``export.json`` counts both), ``labels.csv`` with each file's class
  and soft labels, and ``export.json``. What torchvision's ``ImageFolder`` reads; ``NN_`` keeps the class
  order when folder names are sorted. Reading it back re-applies the preprocessing: within 1/255 of the set
  in pixel space for pixels that were not clipped.
* ``parquet`` (a folder): ``data/train-00000-of-00001.parquet``, one row per image (``image`` a PNG as in
  the image folder, ``label`` its class, ``soft_label``, and ``pixel_values``: the float32 images in the
  set's space, flattened NHWC), with the Hugging Face ``datasets`` features in its schema, so
  ``load_dataset("parquet", data_files=...)`` or ``load_dataset(FOLDER)`` loads it offline; and
  ``preprocessing.safetensors`` (mean, std, ZCA) for the test images. Reading it back is exact.

Every export also writes ``export.json``: the set's metadata, the source and its sha256, what was
approximated. Output paths follow the run-folder rules (:mod:`kernel_distill.runs`): an existing one is
refused unless ``overwrite``, and only an earlier export's files are then replaced.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from kernel_distill.atomic import atomic_write_bytes, atomic_write_text
from kernel_distill.checksums import file_sha256  # noqa: F401 (also re-exported: its old home)
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import DistilledSet, validate_metadata
from kernel_distill.preprocess import Preprocessor

FORMATS = ("safetensors", "imagefolder", "parquet")
LAYOUT_VERSION = 1
LABEL_CENTERING = "one-hot minus 1/num_classes (the KIP convention); learned labels are free"
PARQUET_FILE = "data/train-00000-of-00001.parquet"


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """A distilled set with where it came from.

    Attributes:
      distilled: the set.
      source: the argument it was named by (a file, a run folder, ``zoo:NAME``).
      sha256: hex sha256 of the ``.npz`` file read.
      class_names: one name per label column.
      label_scale: the label scale of the transfer protocol recorded for the set (``None``: not recorded).
      command: the command that made the set, when recorded.
    """

    distilled: DistilledSet
    source: str
    sha256: str
    class_names: tuple[str, ...]
    label_scale: float | None = None
    command: str | None = None


def export_metadata(src: ExportSource) -> dict[str, str]:
    """The string metadata every format carries (safetensors' header, parquet's schema, export.json)."""
    meta = src.distilled.metadata
    pre = src.distilled.preprocessor
    preprocessing = None if pre is None else dict(
        scale="x / 255", standardise="(x - preprocess_mean) / preprocess_std, per channel", zca=pre.uses_zca,
        zca_layer_norm=bool(pre.zca_layer_norm) if pre.uses_zca else None)
    return {
        "format": "kernel-distill/distilled-set", "layout_version": str(LAYOUT_VERSION), "layout": "NHWC",
        "dataset": str(meta.get("dataset") or ""), "method": str(meta.get("method") or ""),
        "kernel": json.dumps(meta.get("kernel")), "get": str(meta.get("get") or ""),
        "label_centering": LABEL_CENTERING,
        "label_scale": "" if src.label_scale is None else repr(float(src.label_scale)),
        "class_names": json.dumps(list(src.class_names)),
        "preprocessing": json.dumps(preprocessing), "command": src.command or "",
        "source": src.source, "source_sha256": src.sha256,
        "metadata": json.dumps(meta, sort_keys=True),
    }


def _tensors(distilled: DistilledSet) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = dict(images=np.ascontiguousarray(distilled.images, np.float32),
                   labels=np.ascontiguousarray(distilled.labels, np.float32),
                   hard_labels=np.asarray(distilled.labels.argmax(axis=1), np.int64))
    tensors.update(_preprocessing_tensors(distilled.preprocessor))
    return tensors


def _preprocessing_tensors(pre: Preprocessor | None) -> dict[str, np.ndarray]:
    if pre is None:
        return {}
    tensors = dict(preprocess_mean=np.ascontiguousarray(pre.mean, np.float32),
                   preprocess_std=np.ascontiguousarray(pre.std, np.float32))
    if pre.zca_matrix is not None:
        tensors["zca_matrix"] = np.ascontiguousarray(pre.zca_matrix, np.float32)
    return tensors


def _preprocessor_from(tensors: dict, zca_layer_norm: bool) -> Preprocessor | None:
    if "preprocess_mean" not in tensors:
        return None
    return Preprocessor(tensors["preprocess_mean"], tensors["preprocess_std"], tensors.get("zca_matrix"),
                        zca_layer_norm)


def _safetensors_numpy():
    try:
        from safetensors import numpy as st
    except ImportError:
        raise KernelDistillError("the safetensors and parquet exports need the safetensors package: "
                                 "pip install 'kernel-distill[export]'") from None
    return st


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise KernelDistillError("the parquet export needs pyarrow: pip install 'kernel-distill[export]'") from None
    return pyarrow


# ----------------------------------------------------------------------------------------------------
# Pixel space.


def to_pixels(distilled: DistilledSet) -> tuple[np.ndarray, dict]:
    """The images in pixel space, float ``[0, 1]`` ``(n, H, W, C)``, and what could not be inverted.

    Standardisation is inverted exactly; a ZCA matrix through its inverse; a per-image layer normalisation
    (KIP's ZCA) cannot be, so such images are rescaled per image to ``[0, 1]``. Values outside ``[0, 1]``
    are clipped; ``clipped_fraction`` counts those more than half an 8-bit step outside. Returns ``(pixels, notes)`` with ``notes = {"clipped_fraction", "exact", "why"}``.
    """
    pre = distilled.preprocessor
    z = np.asarray(distilled.images, np.float64)
    if pre is None:
        raise KernelDistillError("this set carries no preprocessing (a released KIP file): its pixel values are "
                                 "unknown, so it cannot be written as images; export it as safetensors")
    exact, why = True, None
    if pre.zca_matrix is not None:
        z = (z.reshape(len(z), -1) @ np.linalg.inv(pre.zca_matrix.astype(np.float64))).reshape(z.shape)
    x = z * pre.std + pre.mean
    if pre.zca_matrix is not None and pre.zca_layer_norm:
        exact = False
        why = ("learned in ZCA space after a per-image layer normalisation, which removes each image's offset and "
               "scale: the PNGs are rescaled per image to [0, 1]; use the safetensors or parquet export (with "
               "the same preprocessing applied to the test images) for the exact set")
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-12)
    half_step = 0.5 / 255  # beyond this a value no longer rounds to the 8-bit value it is clipped to
    outside = float(np.mean((x < -half_step) | (x > 1.0 + half_step)))
    return np.clip(x, 0.0, 1.0), dict(clipped_fraction=outside, exact=exact, why=why)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """One image ``(H, W, C)`` in ``[0, 1]`` as an 8-bit PNG (grey for one channel, RGB for three)."""
    from PIL import Image

    values = np.round(pixels * 255.0).astype(np.uint8)
    image = Image.fromarray(values[..., 0], mode="L") if values.shape[-1] == 1 else Image.fromarray(values)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)))
    return image[..., None] if image.ndim == 2 else image


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """``NN_NAME`` per class: zero-padded so that sorted folder names keep the class order (torchvision's
    ImageFolder sorts them), the name made safe for a file system."""
    width = len(str(len(class_names) - 1))
    return [f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '-', str(name)).strip('-') or 'class'}"
            for i, name in enumerate(class_names)]


# ----------------------------------------------------------------------------------------------------
# Writers.


def export(src: ExportSource, out: str | os.PathLike, fmt: str) -> dict:
    """Write ``src`` to ``out`` in format ``fmt``; returns a summary (paths, approximations). The caller owns
    ``out`` (:func:`kernel_distill.runs.claim_output_file` or ``claim_output_folder``)."""
    if fmt not in FORMATS:
        raise KernelDistillError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return dict(safetensors=_write_safetensors, imagefolder=_write_imagefolder, parquet=_write_parquet)[fmt](
        src, pathlib.Path(out))


def _write_safetensors(src: ExportSource, path: pathlib.Path) -> dict:
    st = _safetensors_numpy()
    atomic_write_bytes(path, st.save(_tensors(src.distilled), metadata=export_metadata(src)))
    return dict(format="safetensors", path=str(path), exact=True)


def _write_manifest(folder: pathlib.Path, src: ExportSource, fmt: str, notes: dict, files: list[str]) -> None:
    manifest: dict[str, Any] = dict(export_metadata(src), export_format=fmt, files=files, num_images=len(src.distilled.images),
                    num_classes=src.distilled.num_classes, image_shape=list(src.distilled.images.shape[1:]),
                    pixel_space=notes)
    manifest["metadata"] = src.distilled.metadata
    manifest["kernel"] = src.distilled.metadata.get("kernel")
    manifest["class_names"] = list(src.class_names)
    manifest["preprocessing"] = json.loads(manifest["preprocessing"])
    pre = src.distilled.preprocessor
    if pre is not None:  # small enough to read without a tensor library (the ZCA matrix is not)
        manifest["preprocess_mean"] = [float(v) for v in pre.mean]
        manifest["preprocess_std"] = [float(v) for v in pre.std]
    atomic_write_text(folder / "export.json", json.dumps(manifest, indent=2) + "\n")


def _write_imagefolder(src: ExportSource, folder: pathlib.Path) -> dict:
    distilled = src.distilled
    pixels, notes = to_pixels(distilled)
    folders = class_folder_names(src.class_names)
    hard = distilled.labels.argmax(axis=1)
    rows = []
    for i, (image, label) in enumerate(zip(pixels, hard)):
        name = f"train/{folders[label]}/{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / name, _png_bytes(image))
        rows.append([name, int(label), *[repr(float(v)) for v in distilled.labels[i]]])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "label", *[f"soft_label_{k}" for k in range(distilled.num_classes)]])
    writer.writerows(rows)
    atomic_write_text(folder / "labels.csv", text.getvalue())
    _write_manifest(folder, src, "imagefolder", notes, ["train/", "labels.csv"])
    return dict(format="imagefolder", path=str(folder), **notes)


def _hf_features(src: ExportSource, image_size: int) -> dict:
    """The Hugging Face ``datasets`` features of the parquet columns (its schema-metadata form)."""
    return {"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": list(src.class_names), "_type": "ClassLabel"},
        "soft_label": {"feature": {"dtype": "float32", "_type": "Value"}, "length": src.distilled.num_classes,
                       "_type": "List"},
        "pixel_values": {"feature": {"dtype": "float32", "_type": "Value"}, "length": image_size, "_type": "List"},
    }}}


def _write_parquet(src: ExportSource, folder: pathlib.Path) -> dict:
    pa = _pyarrow()
    st = _safetensors_numpy()
    distilled = src.distilled
    n = len(distilled.images)
    flat = np.ascontiguousarray(distilled.images, np.float32).reshape(n, -1)
    image_size, num_classes = flat.shape[1], distilled.num_classes
    notes = dict(clipped_fraction=None, exact=None, why="no preprocessing recorded: no PNG column")
    columns = {}
    if distilled.preprocessor is not None:
        pixels, notes = to_pixels(distilled)
        columns["image"] = pa.array([{"bytes": _png_bytes(p), "path": None} for p in pixels],
                                    type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    columns["label"] = pa.array(distilled.labels.argmax(axis=1).astype(np.int64))
    columns["soft_label"] = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(distilled.labels, np.float32).reshape(-1)), num_classes)
    columns["pixel_values"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), image_size)
    features = _hf_features(src, image_size)
    if "image" not in columns:
        del features["info"]["features"]["image"]
    metadata = {"huggingface": json.dumps(features), "kernel_distill": json.dumps(export_metadata(src))}
    table = pa.table(columns).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink)
    atomic_write_bytes(_mkdirs(folder / PARQUET_FILE), sink.getvalue().to_pybytes())
    atomic_write_bytes(folder / "preprocessing.safetensors",
                       st.save(_preprocessing_tensors(distilled.preprocessor) or
                               dict(none=np.zeros(0, np.float32)), metadata=export_metadata(src)))
    _write_manifest(folder, src, "parquet", notes, [PARQUET_FILE, "preprocessing.safetensors"])
    return dict(format="parquet", path=str(folder), exact=True)


def _mkdirs(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------
# Readers: an export back to a DistilledSet (the round trip the tests check).


def read_export(path: str | os.PathLike) -> DistilledSet:
    """Read any export back: a ``.safetensors`` file, or an image-folder or parquet export folder."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return read_safetensors(path)
    if (path / PARQUET_FILE).is_file():
        return read_parquet(path)
    if (path / "labels.csv").is_file():
        return read_imagefolder(path)
    raise KernelDistillError(f"{path}: not a kernel-distill export (a .safetensors file, or a folder holding "
                             f"{PARQUET_FILE} or labels.csv)")


def _metadata_from(header: dict, source: str) -> tuple[dict, bool]:
    if header.get("format") != "kernel-distill/distilled-set":
        raise KernelDistillError(f"{source}: not a kernel-distill export (metadata format "
                                 f"{header.get('format')!r})")
    try:
        metadata = json.loads(header.get("metadata") or "{}")
        preprocessing = json.loads(header.get("preprocessing") or "null")
    except json.JSONDecodeError as e:
        raise KernelDistillError(f"{source}: its metadata is not valid JSON ({e})") from None
    validate_metadata(metadata, source)
    return metadata, (preprocessing or {}).get("zca_layer_norm") is not False


def read_safetensors(path: str | os.PathLike) -> DistilledSet:
    st = _safetensors_numpy()
    from safetensors import safe_open

    path = pathlib.Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
        tensors = st.load_file(str(path))
    except Exception as e:  # a truncated or foreign file: the library raises its own types
        raise KernelDistillError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    metadata, layer_norm = _metadata_from(header, str(path))
    for name in ("images", "labels"):
        if name not in tensors:
            raise KernelDistillError(f"{path}: no '{name}' tensor")
    return DistilledSet(tensors["images"], tensors["labels"], _preprocessor_from(tensors, layer_norm), metadata)


def read_parquet(folder: str | os.PathLike) -> DistilledSet:
    pa = _pyarrow()
    folder = pathlib.Path(folder)
    try:
        table = pa.parquet.read_table(folder / PARQUET_FILE)
        header = json.loads((table.schema.metadata or {}).get(b"kernel_distill", b"{}"))
        shape = json.loads((folder / "export.json").read_text())["image_shape"]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise KernelDistillError(f"{folder}: not a readable parquet export ({type(e).__name__}: {e})") from None
    metadata, layer_norm = _metadata_from(header, str(folder / PARQUET_FILE))
    n = table.num_rows
    images = np.asarray(table.column("pixel_values").combine_chunks().flatten(), np.float32).reshape(n, *shape)
    labels = np.asarray(table.column("soft_label").combine_chunks().flatten(), np.float32).reshape(n, -1)
    tensors = _safetensors_numpy().load_file(str(folder / "preprocessing.safetensors"))
    return DistilledSet(images, labels, _preprocessor_from(tensors, layer_norm), metadata)


def read_imagefolder(folder: str | os.PathLike) -> DistilledSet:
    """The PNGs back in the set's space (its standardisation re-applied), with the soft labels of labels.csv.

    Within 1/255 in pixel space of the exported set where no pixel was clipped; a ZCA set's image folder is
    not read back (its pixels are only an approximation, see :func:`to_pixels`)."""
    folder = pathlib.Path(folder)
    try:
        manifest = json.loads((folder / "export.json").read_text())
        with open(folder / "labels.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        pixels = np.stack([_png_array((folder / row[0]).read_bytes()) for row in rows])
        labels = np.asarray([[float(v) for v in row[2:]] for row in rows], np.float32)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise KernelDistillError(f"{folder}: not a readable image-folder export ({type(e).__name__}: {e})") \
            from None
    metadata = manifest.get("metadata") or {}
    validate_metadata(metadata, str(folder / "export.json"))
    preprocessing = manifest.get("preprocessing") or {}
    if preprocessing.get("zca"):
        raise KernelDistillError(f"{folder}: the image folder of a ZCA set holds approximate pixels and is not read "
                                 f"back; use its safetensors or parquet export")
    mean, std = manifest.get("preprocess_mean"), manifest.get("preprocess_std")
    preprocessor = Preprocessor(np.asarray(mean, np.float32), np.asarray(std, np.float32)) if mean else None
    images = preprocessor.apply(pixels) if preprocessor is not None else pixels.astype(np.float32) / 255.0
    return DistilledSet(images, labels, preprocessor, metadata)


# ----------------------------------------------------------------------------------------------------
# What to export: a file, a run folder or a zoo set.


def load_source(text: str, data_dir: str | os.PathLike | None = None, progress: bool = False) -> ExportSource:
    """The set named by ``text``: a distilled-set ``.npz``, a run folder (its validation-selected
    ``distilled_best.npz`` if it has one, else its ``distilled.npz`` or ``natural.npz``), or ``zoo:NAME``."""
    from kernel_distill import zoo
    from kernel_distill.data import DATASETS
    from kernel_distill.io import load_distilled
    from kernel_distill.results import read_results

    command, label_scale = None, None
    if isinstance(text, str) and text.startswith(zoo.PREFIX):
        entry = zoo.entry(text[len(zoo.PREFIX):])
        path = pathlib.Path(zoo.resolve(text, data_dir, progress))
        command = entry.get("command")
        transfer = entry.get("transfer") or {}
        if transfer.get("loss", "mse") == "mse":
            label_scale = float(transfer.get("label_scale", 1.0))
    else:
        path = pathlib.Path(text)
        if path.is_dir():
            record = read_results(path)
            artifacts = record.get("artifacts", {})
            name = next((artifacts[k] for k in ("distilled_best", "distilled") if k in artifacts), None)
            if name is None:
                raise KernelDistillError(f"{path}: this {record['command']} run wrote no distilled set")
            path = path / name
            command = record["provenance"].get("command_line")
    distilled = load_distilled(path)
    dataset = distilled.metadata.get("dataset")
    info = DATASETS.get(dataset) if isinstance(dataset, str) else None
    names = tuple(info.class_names) if info is not None and len(info.class_names) == distilled.num_classes \
        else tuple(str(k) for k in range(distilled.num_classes))
    return ExportSource(distilled, str(text), file_sha256(path), names, label_scale,
                        command or distilled.metadata.get("command"))
