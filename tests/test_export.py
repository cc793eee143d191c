"""Exports for PyTorch and Hugging Face users: every zoo set and a run folder in all three formats, read back
exactly (safetensors, parquet) or within 1/255 in pixel space (PNG), parquet loaded with `datasets`, and the
PyTorch snippet of docs/INTEROP.md run against a real export."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from kernel_distill import export, zoo
from kernel_distill.cli import main
from kernel_distill.io import load_distilled

NAMES = [e["name"] for e in zoo.read_index()]
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "INTEROP.md"


def _export(capsys, source: str, out: pathlib.Path, fmt: str) -> pathlib.Path:
    code = main(["export", source, str(out), "--format", fmt])
    assert code == 0, capsys.readouterr().err
    return out


def _same_preprocessing(a, b) -> bool:
    if (a is None) != (b is None):
        return False
    if a is None:
        return True
    zca_same = (a.zca_matrix is None and b.zca_matrix is None) or (
        a.zca_matrix is not None and b.zca_matrix is not None and np.array_equal(a.zca_matrix, b.zca_matrix))
    return (np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std) and zca_same
            and (a.zca_matrix is None or a.zca_layer_norm == b.zca_layer_norm))


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_set_round_trips_through_all_three_formats(name, tmp_path, capsys, request):
    if "recipe" in zoo.entry(name)["preprocessing"]:  # its ZCA matrix is refitted from the real training split
        request.getfixturevalue("shared_data_dir")
    original = zoo.load(name)
    for fmt, out in (("safetensors", tmp_path / "set.safetensors"), ("parquet", tmp_path / "parquet")):
        back = export.read_export(_export(capsys, f"zoo:{name}", out, fmt))
        assert np.array_equal(back.images, original.images) and back.images.dtype == np.float32, fmt
        assert np.array_equal(back.labels, original.labels), fmt
        assert _same_preprocessing(back.preprocessor, original.preprocessor), fmt
        assert back.metadata == original.metadata, fmt
    folder = _export(capsys, f"zoo:{name}", tmp_path / "images", "imagefolder")
    manifest = json.loads((folder / "export.json").read_text())
    pngs = sorted((folder / "train").rglob("*.png"))
    assert len(pngs) == len(original.images)
    if original.preprocessor.uses_zca and original.preprocessor.zca_layer_norm:
        assert manifest["pixel_space"]["exact"] is False and "layer normalisation" in manifest["pixel_space"]["why"]
        return
    back = export.read_export(folder)
    assert np.array_equal(back.labels, original.labels)  # the soft labels of labels.csv, exactly
    pre = original.preprocessor
    want = original.images * pre.std + pre.mean  # the set in pixel space, independently of export.to_pixels
    got = back.images * pre.std + pre.mean
    half_step = 0.5 / 255
    inside = (want >= -half_step) & (want <= 1 + half_step)
    assert np.abs(got - want)[inside].max() <= half_step + 1e-5  # 8-bit rounding, float32 arithmetic
    assert np.mean(~inside) == pytest.approx(manifest["pixel_space"]["clipped_fraction"])
    assert np.all(np.abs(got[want < -half_step]) < 1e-5) and np.all(np.abs(got[want > 1 + half_step] - 1) < 1e-5)


def test_class_folders_keep_the_class_order_when_sorted(tmp_path, capsys):
    folder = _export(capsys, "zoo:fashion_mnist-kip-fc-10ipc", tmp_path / "images", "imagefolder")
    folders = sorted(p.name for p in (folder / "train").iterdir())
    assert folders[0] == "0_T-shirt-top" and folders[9] == "9_Ankle-boot"  # no '/' in a folder name
    rows = (folder / "labels.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert header[:3] == ["file", "label", "soft_label_0"] and len(header) == 12
    assert first[0].startswith(f"train/{folders[int(first[1])]}/")  # each PNG sits in its label's folder


def test_a_run_folder_exports_its_validation_selected_set(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["kip", "--out", str(run), "--per-class", "2", "--steps", "4", "--eval-every", "2",
                 "--target-batch", "100", "--no-progress"]) == 0
    back = export.read_export(_export(capsys, str(run), tmp_path / "run.safetensors", "safetensors"))
    best = load_distilled(run / "distilled_best.npz")
    assert np.array_equal(back.images, best.images) and back.metadata == best.metadata
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run.safetensors"), framework="numpy") as f:
        header = f.metadata()
        hard = f.get_tensor("hard_labels")
    assert header["source_sha256"] == export.file_sha256(run / "distilled_best.npz")
    assert header["command"].startswith("kernel-distill kip --out") and header["dataset"] == "digits"
    assert np.array_equal(hard, best.labels.argmax(axis=1))


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    out = _export(capsys, "zoo:mnist-kip-fc-1ipc", tmp_path / "p", "parquet")
    (out / "mine.txt").write_text("kept\n")
    assert main(["export", "zoo:mnist-kip-fc-1ipc", str(out), "--format", "parquet"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", "zoo:mnist-ls-fc-1ipc", str(out), "--format", "parquet", "--overwrite"]) == 0
    assert export.read_export(out).images.shape[0] == 10 and (out / "mine.txt").read_text() == "kept\n"
    assert main(["export", "zoo:mnist-kip-fc-1ipc", str(tmp_path / "x.npz"), "--format", "safetensors"]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err


def test_the_parquet_export_loads_with_hugging_face_datasets_offline(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    out = _export(capsys, "zoo:fashion_mnist-kip-fc-10ipc", tmp_path / "p", "parquet")
    original = zoo.load("fashion_mnist-kip-fc-10ipc")
    ds = datasets.load_dataset("parquet", data_files=str(out / export.PARQUET_FILE), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.features["label"].names[0] == "T-shirt/top"
    assert ds.features["image"].__class__.__name__ == "Image"
    row = ds[3]
    assert row["image"].size == (28, 28) and row["label"] == int(original.labels[3].argmax())
    np.testing.assert_array_equal(np.asarray(row["soft_label"], np.float32), original.labels[3])
    np.testing.assert_array_equal(np.asarray(row["pixel_values"], np.float32).reshape(28, 28, 1),
                                  original.images[3])
    folder_ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(folder_ds) == 100


def _snippet(title: str) -> str:
    text = DOCS.read_text()
    match = re.search(rf"<!-- snippet: {re.escape(title)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/INTEROP.md has no snippet {title!r}"
    return match.group(1)


def test_the_pytorch_snippet_of_interop_md_scores_a_zca_set_like_the_package(tmp_path, capsys):
    """The snippet loads a safetensors export, maps raw test images with the stored preprocessing (ZCA
    included) and trains nothing: its preprocessed test images must equal the package's own, or a PyTorch
    user would score the set on differently whitened data (FRePo #13)."""
    torch = pytest.importorskip("torch")
    name = next(e["name"] for e in zoo.read_index() if "zca" in e.get("preprocessing", "").lower())
    path = _export(capsys, f"zoo:{name}", tmp_path / "set.safetensors", "safetensors")
    rng = np.random.default_rng(0)
    original = zoo.load(name)
    raw = rng.integers(0, 256, size=(5, *original.images.shape[1:]), dtype=np.uint8)
    namespace = dict(PATH=str(path), RAW_TEST_IMAGES=raw)
    exec(_snippet("pytorch"), namespace)
    n, h, w, c = original.images.shape
    assert tuple(namespace["support_images"].shape) == (n, c, h, w)  # NCHW, as torch.nn.Conv2d expects
    np.testing.assert_array_equal(namespace["support_images"].numpy().transpose(0, 2, 3, 1), original.images)
    want = original.preprocessor.apply(raw)  # NHWC
    got = namespace["test_images"].numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert isinstance(namespace["support_labels"], torch.Tensor)


def test_the_numpy_snippet_of_interop_md_runs(tmp_path, capsys):
    path = _export(capsys, "zoo:mnist-kip-fc-10ipc", tmp_path / "set.safetensors", "safetensors")
    raw = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    namespace = dict(PATH=str(path), RAW_TEST_IMAGES=raw)
    exec(_snippet("jax"), namespace)
    original = zoo.load("mnist-kip-fc-10ipc")
    np.testing.assert_allclose(np.asarray(namespace["test_images"]), original.preprocessor.apply(raw), atol=1e-5)
