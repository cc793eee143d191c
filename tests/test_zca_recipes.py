"""A ZCA stored as its recipe: refitted exactly, cached, and refused when the data is not the recipe's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernel_distill import zca_recipes
from kernel_distill.data import prepare_dataset
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import DistilledSet, load_distilled, save_distilled


@pytest.fixture
def zca_set(tmp_path):
    data = prepare_dataset("digits", zca=True, zca_reg=0.1, val_size=100, progress=False)
    images = data.x_train[:20]
    labels = np.eye(10, dtype=np.float32)[data.y_train[:20]] - 0.1
    return data, DistilledSet(images, labels, data.preprocessor, dict(dataset="digits", method="natural"))


def test_prepared_data_knows_how_its_zca_was_fitted(zca_set):
    data, _ = zca_set
    recipe = data.preprocessor.zca_recipe
    assert recipe is not None and recipe.dataset == "digits" and recipe.val_size == 100
    assert recipe.zca_reg == 0.1 and recipe.rank == 64 and recipe.train_checksum == data.checksums["train"]
    assert prepare_dataset("digits", progress=False).preprocessor.zca_recipe is None  # no ZCA, no recipe


def test_a_recipe_file_holds_no_matrix_and_reads_back_the_same_matrix(zca_set, tmp_path, monkeypatch):
    data, distilled = zca_set
    monkeypatch.setattr(zca_recipes, "_MEMORY", {})
    monkeypatch.setenv(zca_recipes.CACHE_ENV, str(tmp_path / "cache"))  # the suite's shared cache holds others
    with_matrix = save_distilled(tmp_path / "matrix.npz", distilled)
    with_recipe = save_distilled(tmp_path / "recipe.npz", distilled, zca_as_recipe=True)
    with np.load(with_recipe) as f:
        assert "zca_matrix" not in f.files
        metadata = json.loads(str(f["metadata"]))
    assert metadata["format_version"] == 3 and metadata["zca_recipe"]["val_size"] == 100
    with np.load(with_matrix) as f:
        assert "zca_matrix" in f.files and json.loads(str(f["metadata"]))["format_version"] == 2
    loaded = load_distilled(with_recipe)
    # refitted from the same images by the same code: the very matrix the run used
    np.testing.assert_array_equal(loaded.preprocessor.zca_matrix, data.preprocessor.zca_matrix)
    np.testing.assert_array_equal(loaded.preprocessor.apply(np.full((1, 8, 8, 1), 7, np.uint8)),
                                  data.preprocessor.apply(np.full((1, 8, 8, 1), 7, np.uint8)))
    cached = list(zca_recipes.cache_dir().glob("zca-*.npy"))
    assert len(cached) == 1
    # a new process reads the disk cache and refits nothing
    monkeypatch.setattr(zca_recipes, "_MEMORY", {})
    monkeypatch.setattr(zca_recipes, "_refit", lambda *a: pytest.fail("refitted although cached"))
    np.testing.assert_array_equal(load_distilled(with_recipe).preprocessor.zca_matrix, data.preprocessor.zca_matrix)


def test_a_damaged_cache_file_is_refitted(zca_set, tmp_path, monkeypatch):
    data, distilled = zca_set
    path = save_distilled(tmp_path / "recipe.npz", distilled, zca_as_recipe=True)
    monkeypatch.setattr(zca_recipes, "_MEMORY", {})
    monkeypatch.setenv(zca_recipes.CACHE_ENV, str(tmp_path / "cache"))
    key = zca_recipes.recipe_key(data.preprocessor.zca_recipe)
    cache = zca_recipes.cache_dir() / f"zca-{key}.npy"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not an array")
    np.testing.assert_array_equal(load_distilled(path).preprocessor.zca_matrix, data.preprocessor.zca_matrix)
    assert np.load(cache).shape == (64, 64)


@pytest.mark.parametrize("field,value,match", [
    ("train_checksum", "0" * 64, "this one differs"),
    ("val_size", 200, "do not give the file's channel statistics"),
    ("rank", 32, "only full-rank ZCA"),
    ("zca_reg", "big", "bad value"),
])
def test_a_recipe_that_does_not_describe_the_data_is_one_line(zca_set, tmp_path, monkeypatch, field, value, match):
    _, distilled = zca_set
    path = save_distilled(tmp_path / "recipe.npz", distilled, zca_as_recipe=True)
    monkeypatch.setattr(zca_recipes, "_MEMORY", {})
    with np.load(path) as f:
        arrays = dict(f)
    metadata = json.loads(str(arrays["metadata"]))
    metadata["zca_recipe"][field] = value
    arrays["metadata"] = np.array(json.dumps(metadata))
    np.savez(path, **arrays)
    with pytest.raises(KernelDistillError, match=match) as error:
        load_distilled(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_matrix_without_recipe_cannot_be_stored_as_one(zca_set, tmp_path):
    import dataclasses

    _, distilled = zca_set
    bare = dataclasses.replace(distilled, preprocessor=dataclasses.replace(distilled.preprocessor, zca_recipe=None))
    with pytest.raises(KernelDistillError, match="no recipe"):
        save_distilled(tmp_path / "x.npz", bare, zca_as_recipe=True)
    assert not (tmp_path / "x.npz").exists()


def test_processes_needing_the_same_matrix_at_once_refit_it_once(zca_set, tmp_path, monkeypatch):
    """Two loads of one recipe at once (threads here: each opens the lock file itself, as processes do) refit
    the matrix once; the one that waited reads the cache the other wrote."""
    import threading
    import time

    data, distilled = zca_set
    path = save_distilled(tmp_path / "recipe.npz", distilled, zca_as_recipe=True)
    monkeypatch.setattr(zca_recipes, "_MEMORY", {})
    monkeypatch.setenv(zca_recipes.CACHE_ENV, str(tmp_path / "cache"))
    refits, original = [], zca_recipes._refit

    def slow_refit(*args):
        refits.append(1)
        time.sleep(0.5)  # long enough that the other thread arrives while this one refits
        return original(*args)

    monkeypatch.setattr(zca_recipes, "_refit", slow_refit)
    monkeypatch.setattr(zca_recipes, "_MEMORY", _NoMemory())  # each load goes to the disk cache or the refit
    matrices = []
    threads = [threading.Thread(target=lambda: matrices.append(load_distilled(path).preprocessor.zca_matrix))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(matrices) == 2 and len(refits) == 1
    for matrix in matrices:
        np.testing.assert_array_equal(matrix, data.preprocessor.zca_matrix)


class _NoMemory(dict):
    """A process cache that forgets: as if each load ran in a new process."""

    def __setitem__(self, key, value):
        pass
