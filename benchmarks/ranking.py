"""The zoo's sets scored by the field's current standard, DD-Ranking (kernel_distill.ranking, docs/TRANSFER.md).

For each zoo set, with the zoo's own transfer recipe (the evaluation ConvNet, its steps, learning rate, batch,
weight decay and loss, recorded in the index), runs ``kernel-distill transfer zoo:NAME --ranking``: the set,
random class-balanced subsets of the same size, hard labels, the augmentation switched, and the set's images
with one-hot labels, ``--seeds`` seeds each, on the whole test set. The full training set's hard-label
accuracy under the same recipe (DD-Ranking's ``real-hard``, for HLR) is trained once per dataset and recipe,
for ``--full-steps`` steps (the distilled sets' 300 steps are less than one pass over 60,000 images), and
kept in ``--full-results``; a rerun reuses it, and skips sets already in ``--results``. Where that record is
still to make, the set's networks are trained first and the full set after them (one long run without a
checkpoint), so that a run stopped during the full set keeps all of the set's networks.

A set is 21 networks (7 variants x 3 seeds; ``set`` reuses the transfer's own 3), about an hour of one CPU core
for a 10-per-class MNIST set. Each finished network is kept in ``--runs`` (``transfer --ranking-runs``;
benchmarks/results/networks/, beside the records, not one of them), so a
run stopped part-way (a session's end, Ctrl-C) resumes from its finished networks; the file is committed with
the records so that a later session continues where this one stopped.

On a CPU, run one process per core with single-threaded XLA: a 10-per-class evaluation-ConvNet step took
0.44 s against 0.61 s with XLA's default threading, which also used more than one core (2-core machine):

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" ...

Each record also carries the set's storage (image bytes + label bytes at float32) and the compute that
made it (the zoo's recorded wall time and machine). ``benchmarks/tables.py`` makes the table of
docs/BENCHMARKS.md from the records and ``tools/zoo_table.py`` the zoo columns of the README.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/ranking.py --names mnist-kip-fc-1ipc ...
"""

from __future__ import annotations

import argparse
import pathlib
import time

from _cli import cli  # benchmarks/ is on sys.path when a script runs
from kernel_distill import zoo
from kernel_distill.results import append_record, dataset_record, make_record, read_records

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ranking.jsonl"
RUNS = HERE / "results" / "networks" / "ranking_runs.jsonl"  # not records: results/*.jsonl are
FULL_RESULTS = HERE / "results" / "full_set.jsonl"


def recipe_of(entry: dict) -> dict:
    t = entry["transfer"]
    return dict(model=t["model"], steps=t["steps"], learning_rate=t["learning_rate"], batch_size=t["batch_size"],
                weight_decay=t["weight_decay"], loss=t["loss"], augment=t.get("augment") or "none",
                label_scale=t.get("label_scale") or 1.0)


def storage_bytes(entry: dict) -> dict:
    """Image and label bytes of the set at float32 (what a user stores and loads), from the file itself."""
    distilled = zoo.load(entry["name"])
    return dict(storage_image_bytes=int(distilled.images.size * 4), storage_label_bytes=int(distilled.labels.size * 4))


def full_set_key(recipe: dict, full_steps: int, preprocessor=None) -> dict:
    key = dict(recipe, steps=full_steps, loss="ce", label_scale=1.0)
    if preprocessor is not None and preprocessor.uses_zca:
        key["preprocessing"] = "the set's ZCA"
    return key


def find_full_set_record(dataset: str, recipe: dict, full_steps: int, seeds: int, path: pathlib.Path,
                         preprocessor=None) -> dict | None:
    """The full-set record of this dataset, recipe and seeds kept in ``path``, or None."""
    key = full_set_key(recipe, full_steps, preprocessor)
    for record in (read_records(path) if path.is_file() else []):
        if record["dataset"]["name"] == dataset and record["config"]["recipe_key"] == key and \
                record["config"]["seeds"] == seeds:
            return record
    return None


def full_set_record(dataset: str, recipe: dict, full_steps: int, seeds: int, path: pathlib.Path,
                    preprocessor=None) -> dict:
    """The full-set record of this dataset and recipe: read from ``path``, else trained now and appended.
    A set preprocessed with ZCA (CIFAR-10) has the full set trained with that same ZCA."""
    from kernel_distill.experiments import full_set_accuracy
    from kernel_distill.finite import TrainConfig

    found = find_full_set_record(dataset, recipe, full_steps, seeds, path, preprocessor)
    if found is not None:
        return found
    key = full_set_key(recipe, full_steps, preprocessor)
    print(f"full training set of {dataset}: {full_steps} steps x {seeds} seed(s), hard labels ...", flush=True)
    start = time.perf_counter()
    config = TrainConfig(steps=full_steps, optimizer="sgd", learning_rate=recipe["learning_rate"],
                         weight_decay=recipe["weight_decay"], loss="ce", batch_size=recipe["batch_size"],
                         eval_every=full_steps, augment=recipe["augment"])
    result = full_set_accuracy(dataset, recipe["model"], config, seeds=seeds, progress=False,
                               preprocessor=preprocessor if key.get("preprocessing") else None)
    metrics = dict(test_accuracy=result["test_accuracy"], test_accuracy_std=result["test_accuracy_std"],
                   test_accuracies=result["test_accuracies"], train_seconds=result["train_seconds"],
                   num_train=result["num_train"], num_test=result["num_test"])
    record = make_record("benchmark/full_set", "full_set", dataset_record(dataset, result["checksums"],
                                                                           num_train=result["num_train"],
                                                                           num_test=result["num_test"]),
                         metrics, dict(recipe_key=key, seeds=seeds, train=result["recipe"]),
                         wall_seconds=time.perf_counter() - start)
    append_record(path, record)
    print(f"  {100 * result['test_accuracy']:.2f}% ({result['train_seconds']:.0f} s)", flush=True)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=None, help="zoo sets (default: all, smallest first)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--full-steps", type=int, default=1000,
                        help="steps of the full-set run (batch 128: 2.1 passes over 60,000 images; about 0.3 s a "
                             "step for the evaluation ConvNet on one shared CPU core)")
    parser.add_argument("--full-seeds", type=int, default=1)
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--full-results", type=pathlib.Path, default=FULL_RESULTS)
    parser.add_argument("--runs", type=pathlib.Path, default=RUNS,
                        help="every finished network, so that an interrupted set resumes (transfer --ranking-runs)")
    args = parser.parse_args()
    entries = {e["name"]: e for e in zoo.read_index()}
    names = args.names or sorted(entries, key=lambda n: (entries[n]["support_size"], entries[n]["bytes"]))
    done = {r["config"]["set"] for r in (read_records(args.results) if args.results.is_file() else [])}
    for name in names:
        if name in done:
            print(f"{name}: already in {args.results}")
            continue
        entry = entries[name]
        recipe = recipe_of(entry)
        transfer = ("transfer", f"zoo:{name}", "--model", recipe["model"], "--steps", str(recipe["steps"]),
                    "--lr", str(recipe["learning_rate"]), "--batch-size", str(recipe["batch_size"]),
                    "--weight-decay", str(recipe["weight_decay"]), "--loss", recipe["loss"],
                    "--label-scale", str(recipe["label_scale"]), "--augment", recipe["augment"],
                    "--seeds", str(args.seeds), "--eval-every", str(recipe["steps"]), "--ranking",
                    "--ranking-runs", str(args.runs))
        preprocessor = zoo.load(name).preprocessor
        networks_seconds = 0.0  # the set's own wall time, the full-set run left out
        if find_full_set_record(entry["dataset"], recipe, args.full_steps, args.full_seeds, args.full_results,
                                preprocessor) is None:
            # The set's 21 networks first, each kept in --runs as it ends; then the full set, one long run
            # with no checkpoint. Stopped during the full set, a rerun still finds every network done.
            print(f"{name}: the set's networks first (the full-set run comes after them)", flush=True)
            start = time.perf_counter()
            cli(*transfer)
            networks_seconds = time.perf_counter() - start
        full = full_set_record(entry["dataset"], recipe, args.full_steps, args.full_seeds, args.full_results,
                               preprocessor)
        start = time.perf_counter()
        record = cli(*transfer, "--full-set-accuracy", repr(full["metrics"]["test_accuracy"]))
        record["command"] = "benchmark/ranking"
        record["method"] = entry["method"]
        record["metrics"].update(storage_bytes(entry), make_seconds=entry.get("wall_seconds"))
        record["config"].update(set=name, per_class=entry["per_class"], recipe=recipe,
                                full_set=dict(steps=args.full_steps, seeds=args.full_seeds,
                                              accuracy=full["metrics"]["test_accuracy"]),
                                make_machine=entry.get("machine"))
        record["provenance"]["wall_seconds"] = networks_seconds + time.perf_counter() - start
        append_record(args.results, record)
        m = record["metrics"]
        print(f"{name}: set {100 * m['ranking_accuracy_set']:.2f}%, random {100 * m['ranking_accuracy_random']:.2f}%, "
              f"IOR {100 * m['ranking_ior']:+.2f}, HLR {100 * m['ranking_hlr']:.2f}, LRS {100 * m['ranking_lrs']:.2f}%, "
              f"ARS {100 * m['ranking_ars']:.2f}% ({record['provenance']['wall_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
