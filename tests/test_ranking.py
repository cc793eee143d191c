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


def _digits_support(per_class: int = 2):
    from kernel_distill.data import load_dataset, natural_subset
    from kernel_distill.experiments import transfer_support
    from kernel_distill.io import DistilledSet
    from kernel_distill.preprocess import centered_one_hot, fit_preprocessor

    x, y = load_dataset("digits", "train")
    pre = fit_preprocessor(x)
    xs, ys = natural_subset(x, y, per_class, 10, seed=3)
    labels = centered_one_hot(ys, 10) + np.random.default_rng(1).normal(0, 0.1, (10 * per_class, 10)).astype(np.float32)
    return transfer_support(DistilledSet(pre.apply(xs), labels, pre, dict(dataset="digits", method="kip")),
                            "test set", None, None, progress=False)


def test_an_interrupted_ranking_resumes_from_its_finished_runs_and_gives_the_same_scores(monkeypatch):
    """Runs reported through ``on_run`` are not trained again when passed back as ``finished``: a second call
    trains nothing and returns the same accuracies, and ``set_accuracies`` (the transfer's own runs, which equal
    the ``set`` runs) stand in for ``set``; a run missing from ``finished`` (the one a kill cut off)
    is trained again, to the same accuracy; a changed recipe matches no key."""
    from kernel_distill import experiments, finite
    from kernel_distill.finite import TrainConfig

    support = _digits_support()
    config = TrainConfig(steps=15, batch_size=20, learning_rate=0.05, eval_every=15)
    kept: dict[str, dict] = {}
    first = experiments.ranking_runs(support, "fc", config, seeds=1, width=16, progress=False, log=lambda *a: None,
                                     on_run=lambda key, entry: kept.setdefault(key, entry))
    assert len(kept) == 7 and first["reused"] == 0  # set, set_hard, set_aug_toggled, set_natural_labels, random x 3
    assert {e["variant"] for e in kept.values()} == set(first["runs"])
    finished = {key: entry["test_accuracy"] for key, entry in kept.items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    set_key = next(key for key, entry in kept.items() if entry["variant"] == "set")
    with monkeypatch.context() as m:
        m.setattr(finite, "train_seeds", no_training)
        again = experiments.ranking_runs(support, "fc", config, seeds=1, width=16, progress=False,
                                         log=lambda *a: None, finished=finished)
        # what ``transfer`` trained with the same recipe stands in for the ``set`` runs
        stand_in = experiments.ranking_runs(support, "fc", config, seeds=1, width=16, progress=False,
                                            log=lambda *a: None, set_accuracies=[0.5],
                                            finished={k: v for k, v in finished.items() if k != set_key})
        with pytest.raises(KernelDistillError, match="1 seeds"):
            experiments.ranking_runs(support, "fc", config, seeds=1, width=16, progress=False,
                                     set_accuracies=[0.5, 0.25])
    assert again["accuracies"] == first["accuracies"] and again["reused"] == 7
    assert stand_in["runs"]["set"] == [0.5] and stand_in["reused"] == 7
    transferred = experiments.transfer(support, "fc", dataclasses.replace(config, eval_every=5), seeds=1, width=16,
                                       progress=False)
    assert transferred["runs"][0]["test_accuracy"] == pytest.approx(first["runs"]["set"][0], abs=1e-7)

    cut_key = next(key for key, entry in kept.items() if entry["variant"] == "random_hard")
    retrained: list[str] = []
    resumed = experiments.ranking_runs(support, "fc", config, seeds=1, width=16, progress=False, log=lambda *a: None,
                                       finished={k: v for k, v in finished.items() if k != cut_key},
                                       on_run=lambda key, entry: retrained.append(key))
    assert retrained == [cut_key] and resumed["accuracies"] == pytest.approx(first["accuracies"], abs=1e-7)

    other = dataclasses.replace(config, learning_rate=0.02)
    keys = {experiments.ranking_run_key("set", 0, support["x"], support["y"], np.zeros((2, 3)), np.zeros(2), c,
                                        dict(model="fc")) for c in (config, other, dataclasses.replace(config, eval_every=5))}
    assert len(keys) == 2  # the learning rate changes the key, the evaluation interval does not


def test_a_ranking_runs_file_survives_a_line_cut_short(tmp_path):
    from kernel_distill.workflows.transfer import append_finished_run, read_finished_runs

    path = tmp_path / "runs.jsonl"
    assert read_finished_runs(path) == {}
    append_finished_run(path, "sha256:aa", dict(variant="set", seed=0, test_accuracy=0.5, seconds=1.0))
    with open(path, "a") as f:
        f.write('{"key": "sha256:bb", "test_acc')  # the kill came mid-write
    first = dict(key="sha256:aa", variant="set", seed=0, test_accuracy=0.5, seconds=1.0)
    assert read_finished_runs(path) == {"sha256:aa": first}
    append_finished_run(path, "sha256:cc", dict(variant="random", seed=1, test_accuracy=0.25, seconds=1.0))
    assert read_finished_runs(path) == {"sha256:aa": first, "sha256:cc": dict(
        key="sha256:cc", variant="random", seed=1, test_accuracy=0.25, seconds=1.0)}  # the cut line was dropped
    assert path.read_text().count("\n") == 2 and "sha256:bb" not in path.read_text()
    path.write_text('{"key": "sha256:aa", "test_accuracy": 50.0}\n{"key": "sha256:cc", "test_accuracy": 0.25}\n')
    with pytest.raises(KernelDistillError, match=r"runs.jsonl:1: not a run"):
        read_finished_runs(path)  # a percentage is not an accuracy fraction: not what the tool wrote


def test_a_transfer_keeps_each_seed_as_the_rankings_set_run_and_a_resumed_one_trains_only_the_rest(
        tmp_path, monkeypatch):
    """``transfer --ranking --ranking-runs``: each seed the transfer trains is written as it finishes, under the
    key the ranking gives its ``set`` run of that seed; a transfer stopped after seed 0 trains only seed 1 when
    run again, with the same accuracies and curves (through the JSON file); one with every seed kept trains
    nothing; a kept run without a curve (written by the ranking), or with a curve scored at other steps, is
    trained again."""
    from kernel_distill import experiments, finite
    from kernel_distill.finite import TrainConfig
    from kernel_distill.workflows.transfer import append_finished_run, read_finished_runs

    support = _digits_support()
    config = TrainConfig(steps=15, batch_size=20, learning_rate=0.05, eval_every=5)
    kept: dict[str, dict] = {}
    first = experiments.transfer(support, "fc", config, seeds=2, width=16, progress=False,
                                 on_run=lambda key, entry: kept.setdefault(key, entry))
    assert first["reused"] == 0 and [e["seed"] for e in kept.values()] == [0, 1]
    assert {e["variant"] for e in kept.values()} == {"set"}
    # The ranking itself, not given the transfer's accuracies, finds both seeds under its own `set` keys.
    trained_by_ranking: list[str] = []

    def fake_training(model_fn, x, y, x_test, y_test, config, seeds, progress=True):
        return dict(runs=[dict(test_accuracy=0.125, seconds=0.0) for _ in seeds])

    with monkeypatch.context() as m:
        m.setattr(finite, "train_seeds", fake_training)
        ranked = experiments.ranking_runs(support, "fc", config, seeds=2, width=16, progress=False,
                                          log=lambda *a: None,
                                          finished={k: e["test_accuracy"] for k, e in kept.items()},
                                          on_run=lambda key, entry: trained_by_ranking.append(entry["variant"]))
    assert ranked["reused"] == 2 and "set" not in trained_by_ranking and len(trained_by_ranking) == 12
    assert ranked["runs"]["set"] == first["metrics"]["test_accuracies"]

    path = tmp_path / "runs.jsonl"
    seed0_key, seed1_key = kept
    append_finished_run(path, seed0_key, kept[seed0_key])  # the kill came during seed 1
    retrained: list[str] = []
    resumed = experiments.transfer(support, "fc", config, seeds=2, width=16, progress=False,
                                   finished=read_finished_runs(path), on_run=lambda key, entry: retrained.append(key))
    assert retrained == [seed1_key] and resumed["reused"] == 1
    assert resumed["metrics"]["test_accuracies"] == pytest.approx(first["metrics"]["test_accuracies"], abs=1e-7)
    np.testing.assert_allclose([run["curve"] for run in resumed["runs"]], [run["curve"] for run in first["runs"]],
                               atol=1e-7)
    assert resumed["metrics"]["num_parameters"] == first["metrics"]["num_parameters"]

    def no_training(*args, **kwargs):
        raise AssertionError("a kept seed was trained again")

    with monkeypatch.context() as m:
        m.setattr(experiments, "train_seeds", no_training, raising=False)
        m.setattr(finite, "train_seeds", no_training)
        whole = experiments.transfer(support, "fc", config, seeds=2, width=16, progress=False, finished=kept)
    assert whole["reused"] == 2 and whole["metrics"]["test_accuracy"] == pytest.approx(
        first["metrics"]["test_accuracy"], abs=1e-7)

    no_curve = {seed0_key: dict(variant="set", seed=0, test_accuracy=0.5, seconds=1.0)}
    retrained.clear()
    experiments.transfer(support, "fc", config, seeds=1, width=16, progress=False, finished=no_curve,
                         on_run=lambda key, entry: retrained.append(key))
    assert retrained == [seed0_key]
    retrained.clear()  # the same networks scored every 3 steps: the kept curves (every 5) are not theirs
    experiments.transfer(support, "fc", dataclasses.replace(config, eval_every=3), seeds=2, width=16,
                         progress=False, finished=kept, on_run=lambda key, entry: retrained.append(key))
    assert retrained == [seed0_key, seed1_key]
    retrained.clear()  # with a validation split nothing is kept or taken (the guard on the split's seeds)
    with_val = dict(support, x_val=support["x"][:5], y_val=np.zeros(5, np.int64))
    validated = experiments.transfer(with_val, "fc", config, seeds=1, width=16, progress=False, finished=kept,
                                     on_run=lambda key, entry: retrained.append(key))
    assert retrained == [] and validated["reused"] == 0 and "val_accuracy" in validated["metrics"]


def test_the_ranking_benchmark_trains_the_sets_networks_before_a_missing_full_set(tmp_path, monkeypatch):
    """benchmarks/ranking.py: where the full-set record is still to make, the set's networks (kept one by one in
    ``--runs``) come first and the full-set run (no checkpoint) after them; a second run finds the record and
    goes straight to the scored transfer. The transfer command and the full-set training are stubbed: what
    is checked is the order and what reaches the record, not the training."""
    import importlib.util
    import pathlib
    import sys

    from kernel_distill import experiments, zoo
    from kernel_distill.results import dataset_record, make_record, read_records

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("ranking_benchmark", bench / "ranking.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    name = "mnist-kip-fc-1ipc"
    assert name in {e["name"] for e in zoo.read_index()}
    events: list[str] = []
    scores = {k: 0.5 for k in ("ranking_accuracy_set", "ranking_accuracy_random", "ranking_ior", "ranking_hlr",
                                "ranking_lrs", "ranking_ars")}

    def fake_cli(*args):
        events.append("transfer with full set" if "--full-set-accuracy" in args else "transfer")
        assert args[:2] == ("transfer", f"zoo:{name}") and "--ranking-runs" in args
        return make_record("transfer", "kip", dataset_record("mnist", num_test=10000), dict(scores), {})

    def fake_full_set(dataset, model, config, **kwargs):
        events.append("full set")
        return dict(test_accuracy=0.99, test_accuracy_std=0.0, test_accuracies=[0.99], train_seconds=1.0,
                    num_train=60000, num_test=10000, checksums={}, recipe={})

    monkeypatch.setattr(script, "cli", fake_cli)
    monkeypatch.setattr(experiments, "full_set_accuracy", fake_full_set)
    args = ["ranking.py", "--names", name, "--results", str(tmp_path / "r.jsonl"),
            "--full-results", str(tmp_path / "full.jsonl"), "--runs", str(tmp_path / "runs.jsonl")]
    monkeypatch.setattr(sys, "argv", args)
    script.main()
    assert events == ["transfer", "full set", "transfer with full set"]
    [record] = read_records(tmp_path / "r.jsonl")
    assert record["config"]["set"] == name and record["config"]["full_set"]["accuracy"] == 0.99
    (tmp_path / "r.jsonl").unlink()  # the set again, its full-set record now kept
    events.clear()
    script.main()
    assert events == ["transfer with full set"]
