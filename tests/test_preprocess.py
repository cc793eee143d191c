"""Preprocessing: standardisation, ZCA whitening (checked by its defining property), centred labels."""

from __future__ import annotations

import numpy as np
import pytest

from kernel_distill.errors import KernelDistillError
from kernel_distill.preprocess import centered_one_hot, fit_preprocessor


@pytest.fixture
def images(rng):
    # Correlated channels and pixels so that whitening has something to do.
    base = rng.normal(size=(600, 2, 2, 1))
    x = np.concatenate([base, 0.5 * base + 0.2 * rng.normal(size=base.shape), rng.normal(size=base.shape)], -1)
    return np.clip(128 + 40 * x, 0, 255).astype(np.uint8)


def test_standardisation_uses_training_channel_statistics(images):
    pre = fit_preprocessor(images)
    z = pre.apply(images)
    assert z.dtype == np.float32 and z.shape == images.shape
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-4)
    np.testing.assert_allclose(pre.mean, (images / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)


def test_zca_without_regulariser_whitens_exactly(images):
    pre = fit_preprocessor(images, zca=True, zca_reg=0.0, zca_layer_norm=False)
    flat = pre.apply(images).reshape(len(images), -1).astype(np.float64)
    np.testing.assert_allclose(flat.T @ flat / len(flat), np.eye(flat.shape[1]), atol=1e-4)
    # ZCA is the symmetric whitening matrix: the one closest to the identity.
    np.testing.assert_allclose(pre.zca_matrix, pre.zca_matrix.T, atol=1e-5)


def test_zca_regulariser_shrinks_eigenvalues_as_kip_did(images):
    reg = 0.1
    pre = fit_preprocessor(images, zca=True, zca_reg=reg, zca_layer_norm=False)
    standardised = fit_preprocessor(images).apply(images).reshape(len(images), -1).astype(np.float64)
    cov = standardised.T @ standardised / len(standardised)
    s = np.linalg.eigvalsh(cov)
    expected = np.sort(s / (s + reg * np.trace(cov) / len(s)))
    flat = pre.apply(images).reshape(len(images), -1).astype(np.float64)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(flat.T @ flat / len(flat))), expected, atol=1e-4)


def test_zca_with_layer_norm_normalises_each_image_first(images):
    pre = fit_preprocessor(images, zca=True)
    z = pre.apply(images[:3])
    assert z.shape == (3, 2, 2, 3) and np.all(np.isfinite(z))
    # Layer norm maps a standardised image z and the image 2 z + c (in standardised space) to the same point.
    standardised = (images[:1] / 255.0 - pre.mean) / pre.std
    shifted = ((2.0 * standardised + 0.7) * pre.std + pre.mean) * 255.0
    np.testing.assert_allclose(pre.apply(shifted), z[:1], atol=1e-4)


def test_to_viewable_inverts_standardisation(images):
    pre = fit_preprocessor(images)
    np.testing.assert_allclose(pre.to_viewable(pre.apply(images[:5])), images[:5] / 255.0, atol=1e-5)


def test_centered_one_hot():
    y = centered_one_hot(np.array([0, 2, 1]), 3)
    np.testing.assert_allclose(y, np.array([[2, -1, -1], [-1, -1, 2], [-1, 2, -1]]) / 3.0, atol=1e-7)
    np.testing.assert_allclose(y.sum(axis=1), 0, atol=1e-7)
    with pytest.raises(KernelDistillError, match="lie in"):
        centered_one_hot(np.array([3]), 3)


def test_bad_inputs(images):
    with pytest.raises(KernelDistillError, match="NHWC"):
        fit_preprocessor(images[0])
    with pytest.raises(KernelDistillError, match="channel"):
        fit_preprocessor(images).apply(images[..., :1])
