"""DD-Ranking's scores (closed forms from its definitions) and the runs that feed them (against independent
training runs)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from kernel_distill import ranking
from kernel_distill.errors import KernelDistillError


def test_the_normalisation_maps_minus_one_zero_one_as_dd_ranking_defines():
    e = math.e
    assert ranking.normalised(-1.0) == pytest.approx(0.0, abs=1e-12)
    assert ranking.normalised(1.0) == pytest.approx(1.0)
    assert ranking.normalised(0.0) == pytest.approx((1 - 1 / e) / (e - 1 / e))  # 0.2689...


def test_lrs_and_ars_are_the_weighted_normalised_differences():
    # A set at 60% (hard labels 50%) against random 40%, full data 99%: IOR 0.2, HLR 0.49.
    ior = ranking.improvement_over_random(0.60, 0.40)
    hlr = ranking.hard_label_recovery(0.99, 0.50)
    assert ior == pytest.approx(0.20) and hlr == pytest.approx(0.49)
    alpha = 0.5 * 0.20 - 0.5 * 0.49
    assert ranking.label_robust_score(ior, hlr) == pytest.approx((np.exp(alpha) - np.exp(-1)) / (np.e - np.exp(-1)))
    assert ranking.label_robust_score(ior, hlr, weight=1.0) == pytest.approx(ranking.normalised(0.20))
    beta = 0.3 * 0.10 + 0.7 * 0.05
    assert ranking.augmentation_robust_score(0.10, 0.05, weight=0.3) == pytest.approx(ranking.normalised(beta))
    with pytest.raises(KernelDistillError, match="accuracy fraction"):
        ranking.improvement_over_random(60.0, 40.0)  # percentages are refused, not silently exponentiated
    with pytest.raises(KernelDistillError, match="weight"):
        ranking.label_robust_score(0.1, 0.1, weight=2.0)


def test_scores_use_what_is_there_and_put_the_augmented_gain_first():
    acc = dict(set=0.6, random=0.4, set_hard=0.5, random_hard=0.45, set_aug_toggled=0.7, random_aug_toggled=0.45)
    without_full = ranking.scores(acc, augmented=False)
    assert set(without_full) == {"ior", "ior_hard", "ars"}  # no full-set number: no HLR, no LRS
    # The recipe did not augment, so the toggled runs are the augmented ones: gain 0.25 with, 0.2 without.
    assert without_full["ars"] == pytest.approx(ranking.normalised(0.5 * 0.25 + 0.5 * 0.2))
    full = ranking.scores(dict(acc, full_hard=0.9), augmented=True)
    assert full["hlr"] == pytest.approx(0.4) and full["lrs"] == pytest.approx(ranking.normalised(0.5 * 0.2 - 0.5 * 0.4))


def test_ranking_runs_match_independent_training_runs(tmp_path):
    """Every accuracy of ranking_runs equals a run trained here directly on the same images, labels, recipe and
    seed: the random subsets are class-balanced draws of the set's size, mapped with the set's preprocessing."""
    from kernel_distill.data import load_dataset, natural_subset
    from kernel_distill.experiments import ranking_runs, transfer_support
    from kernel_distill.finite import TrainConfig, build_model, train_seeds
    from kernel_distill.io import DistilledSet
    from kernel_distill.preprocess import centered_one_hot, fit_preprocessor

    x, y = load_dataset("digits", "train")
    pre = fit_preprocessor(x)
    xs, ys = natural_subset(x, y, 3, 10, seed=7)
    labels = centered_one_hot(ys, 10) + np.random.default_rng(0).normal(0, 0.1, (30, 10)).astype(np.float32)
    file_set = DistilledSet(pre.apply(xs), labels, pre, dict(dataset="digits", method="kip"))
    support = transfer_support(file_set, "test set", None, None, progress=False)
    config = TrainConfig(steps=20, batch_size=30, learning_rate=0.05, eval_every=5)
    result = ranking_runs(support, "fc", config, seeds=2, width=32, full_hard_accuracy=0.95, progress=False,
                          log=lambda *a: None)
    acc = result["accuracies"]
    assert set(acc) == {"set", "set_hard", "set_aug_toggled", "set_natural_labels", "random", "random_hard",
                        "random_aug_toggled", "full_hard"}
    assert result["toggled_augment"] == "dsa"
    x_test, y_test = load_dataset("digits", "test")
    z_test = pre.apply(x_test)

    def model_fn():
        return build_model("fc", 10, 32, None, "standard")

    once = dataclasses.replace(config, eval_every=config.steps)
    direct = train_seeds(model_fn, file_set.images, labels, z_test, y_test, once, range(2), progress=False)
    assert acc["set"] == pytest.approx(direct["mean"], abs=1e-7)
    randoms = []
    for seed in range(2):
        rx, ry = natural_subset(x, y, 3, 10, seed)
        assert np.bincount(ry, minlength=10).tolist() == [3] * 10
        run = train_seeds(model_fn, pre.apply(rx), centered_one_hot(ry, 10), z_test, y_test, once, [seed],
                          progress=False)
        randoms.append(run["runs"][0]["test_accuracy"])
    assert acc["random"] == pytest.approx(np.mean(randoms), abs=1e-7)
    assert result["scores"]["ior"] == pytest.approx(acc["set"] - acc["random"])
    assert result["scores"]["hlr"] == pytest.approx(0.95 - acc["set_hard"])
