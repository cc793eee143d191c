"""The README's numbers, each checked against the record it comes from.

Every percentage in README.md (outside the zoo table, which ``tools/zoo_table.py --check`` regenerates) and the
zoo's size must appear in one of the fragments below, and each fragment is built from its source: the zoo's
``index.json``, a record of ``benchmarks/results/*.jsonl``, the bytes on disk, or the code. A README number
that drifts from its record, or a new number typed without a source, fails here. To add a number to the
README, add its fragment and its source to ``CLAIMS``.
"""

from __future__ import annotations

import decimal
import json
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ZOO_DIR = REPO / "src" / "kernel_distill" / "zoo"


def readme() -> str:
    return (REPO / "README.md").read_text()


def flat(text: str) -> str:
    """Text as one line: line breaks, indents and the ``#`` of a shell comment's continuation lines become one
    space, so that rewrapping a paragraph changes nothing here."""
    return re.sub(r"\s*\n[ \t]*(?:#+[ \t]+)?|[ \t]+", " ", text)


def prose() -> str:
    """The README, flat, without its generated blocks (``<!-- generated: ... -->`` to ``<!-- end generated -->``)."""
    return flat(re.sub(r"<!-- generated:.*?<!-- end generated -->", " ", readme(), flags=re.S))


def pct(fraction: float, digits: int = 1) -> str:
    """``0.4725 -> "47.3%"``: a percentage rounded half up (as the docs' tables are read), float noise aside."""
    value = decimal.Decimal(repr(round(100 * fraction, 9)))
    return f"{value.quantize(decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP)}%"


def _get(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def one(name: str, where: dict) -> dict:
    """The single record of ``benchmarks/results/<name>.jsonl`` whose fields (dotted paths) match ``where``;
    a value may be a predicate."""
    lines = (RESULTS / f"{name}.jsonl").read_text().splitlines()
    found = []
    for line in filter(str.strip, lines):
        record = json.loads(line)
        if all(want(_get(record, k)) if callable(want) else _get(record, k) == want for k, want in where.items()):
            found.append(record)
    assert len(found) == 1, f"{len(found)} records of {name}.jsonl match {where}"
    return found[0]


def zoo_entry(name: str) -> dict:
    (entry,) = [e for e in json.loads((ZOO_DIR / "index.json").read_text())["sets"] if e["name"] == name]
    return entry


def ends(suffix: str):
    return lambda value: isinstance(value, str) and value.endswith(suffix)


# ----------------------------------------------------------------------------------------------------
# Sources.


def _rf(dataset, method, per_class=10):
    """A record of the random-feature benchmark; its transfer is the README's protocol: 300 MSE steps, 3 seeds."""
    record = one("rf_distillation", {"dataset.name": dataset, "method": method, "config.per_class": per_class})
    train = record["config"]["train"]
    assert (train["steps"], train["loss"], record["config"]["seeds"]) == (300, "mse", 3), record["config"]
    return record


def _tuned(file_suffix):
    return one("transfer_tuned", {"config.file": ends(file_suffix)})["metrics"]["test_accuracy"]


def _protocol(**where):
    return one("transfer_protocol", {"dataset.name": "cifar10", **where})["metrics"]["test_accuracy"]


def _cifar_natural_ce():
    return _protocol(**{"config.natural_per_class": 10, "config.train.loss": "ce", "config.train.augment": "flip-crop"})


def _cifar_in_ce():
    return _protocol(**{"config.file": ends("cifar-rf-10-in/distilled_best.npz"), "config.train.loss": "ce"})


def _cifar_platt_ce():
    return _protocol(**{"config.file": ends("cifar-rf-10-platt/distilled_best.npz"), "config.train.loss": "ce"})


def _kip_fc_measured(per_class, steps):
    record = one("kip_fc", {"dataset.name": "mnist", "config.per_class": per_class, "config.steps": steps,
                            "config.kernel.depth": 1, "config.learn_labels": True,
                            "provenance.source": lambda v: v != "transcribed"})
    return record["metrics"]["test_accuracy_final"]


def _kip_default_run():
    record = one("kip_default_run", {"dataset.name": "mnist", "config.per_class": 10, "config.steps": 6000})
    config = record["config"]
    assert (config["kernel"]["depth"], config["learning_rate"], config["target_batch_size"],
            config["default_target_batch"]) == (2, 0.01, None, 10_000), config
    return record


def _transfer(dataset, kind, per_class):
    record = one("transfer", {"dataset.name": dataset, "config.model": "evalnet", "config.set": kind,
                              "config.per_class": per_class, "config.loss": "mse", "config.steps": 300})
    assert record["config"]["seeds"] == 3
    return record["metrics"]["test_accuracy"]


def _label_solve_mnist_100():
    return one("label_solve", {"dataset.name": "mnist", "config.support_size": 100, "config.kernel.architecture": "fc",
                               "config.kernel.depth": 1})["metrics"]


def _ray_float32_loss_difference() -> str:
    """The largest relative difference between a Ray run's final KIP loss and the local run before it."""
    worst, local = 0.0, None
    for line in (RESULTS / "distributed.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["provenance"]["dtype"] == "float32"
        loss = record["metrics"]["final_loss"]
        if record["config"]["backend"] == "local":
            local = loss
        else:
            worst = max(worst, abs(loss - local) / abs(local))
    assert worst > 0
    mantissa, exponent = f"{worst:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _tolerance_in_tests(text: str, test_file: str) -> str:
    assert text in (REPO / "tests" / test_file).read_text(), f"{test_file} no longer checks {text}"
    return text.split("=")[1]


def _zoo_megabytes() -> str:
    """What the package ships of the zoo (index and sets, as package-data says), in MB (10^6 bytes)."""
    files = [ZOO_DIR / "index.json", *(ZOO_DIR / "sets").glob("*.npz")]
    return f"{round(sum(f.stat().st_size for f in files) / 1e6)} MB"


def _convnet_offsets() -> str:
    """Per pixel, the offsets the ConvNet kernel stores at 32x32 (of 32 * 32)."""
    from kernel_distill.kernels import KernelSpec
    from kernel_distill.kernels.api import pair_elements

    per_pixel = pair_elements(KernelSpec("convnet"), (32, 32, 3)) // (32 * 32)
    return f"{per_pixel} of {32 * 32:,} per pixel at 32x32"


def _digits_demo_split() -> str:
    from kernel_distill.data import default_val_size, load_dataset

    x_train, _ = load_dataset("digits", "train")
    return f"({len(x_train):,} training images, of which {default_val_size('digits')} are held out for validation)"


def _mnist_val_size() -> str:
    from kernel_distill.data import default_val_size

    return f"{default_val_size('mnist'):,} training images are held out (--val-size)"


# The README's fragments, each built from its source (a function, called in the test).
CLAIMS = {
    "convnet-offsets": lambda: _convnet_offsets(),
    "rf-transfer": lambda: (
        f"seeds): MNIST {pct(_rf('mnist', 'kip-rf-platt-in')['metrics']['transfer_test_accuracy'])} (published "
        f"exact-kernel KIP: {pct(zoo_entry('mnist-kip-convnet3rf-in-10ipc')['published']['accuracy'])}) and "
        f"Fashion-MNIST {pct(_rf('fashion_mnist', 'kip-rf-platt-in')['metrics']['transfer_test_accuracy'])} (10 "
        f"natural images per class: {pct(_rf('fashion_mnist', 'natural')['metrics']['transfer_test_accuracy'])})"),
    "rf-cifar": lambda: (
        f"CIFAR-10 (lossy copy) {pct(_tuned('cifar-rf-10-in-r2/distilled_best.npz'))} with the label scale chosen on "
        f"validation, {pct(_cifar_in_ce())} with a fixed cross-entropy protocol under which natural images give "
        f"{pct(_cifar_natural_ce())}"),
    "kip-zoo": lambda: (
        f"KRR test accuracy: {pct(zoo_entry('mnist-kip-fc-1ipc')['krr']['test_accuracy'], 2)} from 1 image per class "
        f"and {pct(zoo_entry('mnist-kip-fc-10ipc')['krr']['test_accuracy'], 2)} from 10, the zoo's "
        f"`mnist-kip-fc-1ipc` and `mnist-kip-fc-10ipc` (the step chosen on validation"),
    "kip-fc-runs": lambda: (
        f"runs of `docs/BENCHMARKS.md` (depth 1, labels learned too, 3,000 and 6,000 steps, re-measured on the "
        f"CPU) end at {pct(_kip_fc_measured(1, 3000), 2)} and {pct(_kip_fc_measured(10, 6000), 2)}."),
    "kip-defaults": lambda: (
        f"`kip`'s defaults (FC NTK depth 2, Adam lr 0.01, 10,000 targets per step) were chosen on the validation "
        f"split (`docs/KIP.md`): with them, `kip --dataset mnist --per-class 10 --kernel fc --learn-labels --steps "
        f"6000` reaches {pct(_kip_default_run()['metrics']['test_accuracy'], 2)} (published 97.2%)"),
    "label-solve": lambda: (
        f"KRR test accuracy of 100 random MNIST images with the FC NTK: "
        f"{pct(_label_solve_mnist_100()['test_accuracy_original_labels'])} with their one-hot labels, "
        f"{pct(_label_solve_mnist_100()['test_accuracy'])} with the solved ones"),
    "transfer": lambda: (
        f"Fashion-MNIST 10/class {pct(_transfer('fashion_mnist', 'ls', 10))} vs "
        f"{pct(_transfer('fashion_mnist', 'natural', 10))}, MNIST 1/class {pct(_transfer('mnist', 'ls', 1))} vs "
        f"{pct(_transfer('mnist', 'natural', 1))}"),
    "ray": lambda: (
        f"Equal to the local backend to {_tolerance_in_tests('rtol=1e-10', 'test_distributed.py')} in float64; in "
        f"float32, where sums run in another order, within about "
        f"{_tolerance_in_tests('rtol=1e-4', 'test_distributed.py')} (a 3-step ConvNet KIP run's loss: "
        f"{_ray_float32_loss_difference()} relative)"),
    "demo-split": lambda: _digits_demo_split(),
    "mnist-val-size": lambda: _mnist_val_size(),
    "platt-krr": lambda: (
        f"(CIFAR-10 KRR {pct(_rf('cifar10', 'kip-rf-platt')['metrics']['krr_test_accuracy'])} vs "
        f"{pct(_rf('cifar10', 'kip-rf')['metrics']['krr_test_accuracy'])}; docs/BENCHMARKS.md)"),
    "instance-norm": lambda: (
        f"(with Platt: CIFAR-10 {pct(_cifar_in_ce())} vs {pct(_cifar_platt_ce())}, Fashion-MNIST "
        f"{pct(_tuned('fashion-rf-10-in/distilled_best.npz'))} vs "
        f"{pct(_tuned('fashion-rf-10-platt/distilled_best.npz'))}; "
        f"MNIST {pct(_rf('mnist', 'kip-rf-platt-in')['metrics']['transfer_test_accuracy'])} against "
        f"{pct(_rf('mnist', 'kip-rf')['metrics']['transfer_test_accuracy'])} for the squared-error set without it"),
    "label-scale": lambda: f"(CIFAR-10: {pct(_tuned('cifar-rf-10-in-r2/distilled_best.npz'))}; docs/TRANSFER.md)",
    "zoo-size": lambda: f"(`kernel_distill/zoo/`, {_zoo_megabytes()})",
}


# Checked by running the demo (test_readme_demo_numbers_are_what_the_demo_measures), not by a record.
DEMO = re.compile(r"\(([\d,]+) steps, about half a minute on 2 CPU cores; on a CPU, (\d+\.\d+)% KRR test accuracy "
                  r"for the final support, (\d+\.\d+)% for the validation-selected one\)")


@pytest.mark.parametrize("name", CLAIMS)
def test_readme_number_matches_its_source(name):
    fragment = flat(CLAIMS[name]())
    assert fragment in prose(), f"README.md should say (from the records):\n{fragment}"


def test_every_percentage_and_size_in_the_readme_has_a_checked_source():
    text = prose()
    covered = []
    for make in CLAIMS.values():
        try:
            fragment = flat(make())
        except AssertionError:
            continue  # reported by the test above
        covered += [(m.start(), m.end()) for m in re.finditer(re.escape(fragment), text)]
    covered += [(m.start(), m.end()) for m in DEMO.finditer(text)]
    numbers = list(re.finditer(r"\d[\d,]*(?:\.\d+)?\s?(?:%|MB|GB)", text))
    assert numbers  # the pattern finds them
    unchecked = [m.group() for m in numbers if not any(a <= m.start() and m.end() <= b for a, b in covered)]
    assert not unchecked, f"numbers in README.md without a source in tests/test_readme.py: {unchecked}"


def test_the_coverage_check_can_fail(monkeypatch):
    """A number typed into the README without a source is caught, and so is one that no longer matches its
    source."""
    text = readme()
    monkeypatch.setattr(sys.modules[__name__], "readme", lambda: text + "\nNow 99.9% faster.\n")
    with pytest.raises(AssertionError, match="99.9%"):
        test_every_percentage_and_size_in_the_readme_has_a_checked_source()
    monkeypatch.setattr(sys.modules[__name__], "readme", lambda: text.replace("89.66%", "89.67%"))
    with pytest.raises(AssertionError, match="89.66%"):
        test_readme_number_matches_its_source("kip-zoo")


@pytest.mark.slow
def test_readme_demo_numbers_are_what_the_demo_measures(tmp_path, capsys):
    """``kernel-distill demo`` (what ``make demo`` runs) gives the README's accuracies: exactly on a CPU, where
    they were measured; within 2 of the 359 test images elsewhere (other float rounding)."""
    import jax

    from kernel_distill.cli import main
    from kernel_distill.results import read_results

    (match,) = DEMO.finditer(prose())
    steps, final, best = int(match.group(1).replace(",", "")), match.group(2), match.group(3)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    capsys.readouterr()
    record = read_results(tmp_path / "demo")
    metrics = record["metrics"]
    assert record["config"]["steps"] == metrics["steps"] == steps and metrics["num_test"] == 359
    if jax.devices()[0].platform == "cpu":
        assert (pct(metrics["test_accuracy_final"], 2), pct(metrics["test_accuracy"], 2)) == (f"{final}%", f"{best}%")
    else:
        assert abs(100 * metrics["test_accuracy_final"] - float(final)) <= 100 * 2 / 359
        assert abs(100 * metrics["test_accuracy"] - float(best)) <= 100 * 2 / 359
