"""The field's current evaluation standard for a distilled set: DD-Ranking's scores.

DD-Ranking (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", arXiv 2505.13300,
2025; https://github.com/NUS-HPC-AI-Lab/DD-Ranking, ``doc/introduction.md`` and ``ddranking/metrics``)
scores a set against a random class-balanced subset of the same size trained with the same recipe, so
that what the labels and the augmentation contribute is not credited to the images. With accuracies as
fractions, all from finite networks trained on the set with one recipe:

* **HLR**, hard label recovery: ``acc(full training set, hard labels) - acc(set, hard labels)``; lower is better.
* **IOR**, improvement over random: ``acc(set, its own labels) - acc(random subset, same recipe)``; higher
  is better.
* **LRS**, label-robust score: ``alpha = w * IOR - (1 - w) * HLR`` (``w = 0.5`` on the leaderboard),
  normalised as ``(exp(alpha) - exp(-1)) / (e - exp(-1))``, reported in percent.
* **ARS**, augmentation-robust score: ``beta = g * (gain over random with augmentation) + (1 - g) * (gain
  without)`` (``g = 0.5``), normalised the same way.

Pure functions of accuracies; :func:`kernel_distill.experiments.ranking_runs` trains the networks.
"""

from __future__ import annotations

import math

from kernel_distill.errors import KernelDistillError

DEFAULT_WEIGHT = 0.5


def normalised(x: float) -> float:
    """DD-Ranking's map of a weighted accuracy difference in ``[-1, 1]`` to ``[0, 1]``:
    ``(exp(x) - exp(-1)) / (e - exp(-1))``."""
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _check(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise KernelDistillError(f"{name} must be an accuracy fraction in [0, 1], got {value!r}")
    return float(value)


def _check_weight(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise KernelDistillError(f"a DD-Ranking weight lies in [0, 1], got {weight}")
    return float(weight)


def hard_label_recovery(full_hard: float, set_hard: float) -> float:
    """HLR = acc(full set, hard labels) - acc(set, hard labels)."""
    return _check("full-set accuracy", full_hard) - _check("hard-label accuracy", set_hard)


def improvement_over_random(set_any: float, random_any: float) -> float:
    """IOR = acc(set, its own protocol) - acc(random subset of the same size, same protocol)."""
    return _check("set accuracy", set_any) - _check("random-subset accuracy", random_any)


def label_robust_score(ior: float, hlr: float, weight: float = DEFAULT_WEIGHT) -> float:
    """LRS in ``[0, 1]``: ``normalised(w * IOR - (1 - w) * HLR)``."""
    weight = _check_weight(weight)
    return normalised(weight * ior - (1.0 - weight) * hlr)


def augmentation_robust_score(gain_with_augmentation: float, gain_without: float,
                              weight: float = DEFAULT_WEIGHT) -> float:
    """ARS in ``[0, 1]``: ``normalised(g * gain_aug + (1 - g) * gain_no_aug)``; each gain is the set's accuracy
    minus the random subset's under the same recipe, with and without augmentation."""
    weight = _check_weight(weight)
    return normalised(weight * gain_with_augmentation + (1.0 - weight) * gain_without)


def scores(accuracies: dict, augmented: bool, weight: float = DEFAULT_WEIGHT) -> dict:
    """Every DD-Ranking quantity the ``accuracies`` allow (keys as :func:`experiments.ranking_runs` writes
    them: ``set``, ``random``, ``set_hard``, ``random_hard``, ``full_hard``, ``set_aug_toggled``,
    ``random_aug_toggled``); ``augmented``: whether the recipe of ``set`` and ``random`` augments (the
    ``_aug_toggled`` runs then do not). A score whose inputs are missing is left out."""
    out = {}
    if "set" in accuracies and "random" in accuracies:
        out["ior"] = improvement_over_random(accuracies["set"], accuracies["random"])
    if "set_hard" in accuracies and "random_hard" in accuracies:
        out["ior_hard"] = improvement_over_random(accuracies["set_hard"], accuracies["random_hard"])
    if "full_hard" in accuracies and "set_hard" in accuracies:
        out["hlr"] = hard_label_recovery(accuracies["full_hard"], accuracies["set_hard"])
    if "ior" in out and "hlr" in out:
        out["lrs"] = label_robust_score(out["ior"], out["hlr"], weight)
    if "ior" in out and "set_aug_toggled" in accuracies and "random_aug_toggled" in accuracies:
        toggled = improvement_over_random(accuracies["set_aug_toggled"], accuracies["random_aug_toggled"])
        with_aug, without = (out["ior"], toggled) if augmented else (toggled, out["ior"])
        out["ars"] = augmentation_robust_score(with_aug, without, weight)
    return out
