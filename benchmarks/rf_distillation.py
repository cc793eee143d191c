"""Distillation with the random-feature ConvNet kernel: KRR and finite-network accuracy of the sets it makes.

For a finished KIP run folder (made by ``kernel-distill kip --kernel convnet-rf ...``), measures its
validation-selected set (``distilled_best.npz``) on the whole test set:

* KRR test accuracy with the kernel recorded in the file (the fixed evaluation networks);
* the finite evaluation ConvNet (``transfer --model evalnet``), ``--seeds`` seeds, mean +- std;
* the same for a natural class-balanced subset of the same size in the same preprocessing, and for any
  ``--compare`` files (e.g. a KIP set made with the FC kernel).

Each set's record (with the KIP run's command line, wall time and steps) is appended to
``benchmarks/results/rf_distillation.jsonl``; ``benchmarks/tables.py`` makes the table of docs/BENCHMARKS.md.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/rf_distillation.py \\
        --run runs/cifar-rf-10 --compare kip-fc=runs/cifar-fc-10/distilled_best.npz --train-steps 300
"""

from __future__ import annotations

import argparse
import json
import pathlib

from _cli import cli  # benchmarks/ is on sys.path when a script runs

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "rf_distillation.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished KIP run folder")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                        help="another distilled set of the same dataset and size to measure beside it")
    parser.add_argument("--no-natural", action="store_true", help="skip the natural subset")
    parser.add_argument("--no-kip", action="store_true", help="skip the run's own set (e.g. measured before)")
    parser.add_argument("--name", default="kip-rf",
                        help="the run's set in the table (default kip-rf; e.g. kip-rf-platt for a --loss platt run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--exact-test-limit", type=int, default=0, metavar="N",
                        help="also KRR with the exact ConvNet NNGP (the -rf kernel's architecture) on the first N "
                             "test images (0: skip; 1000 takes about a minute per set of 100 here)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    from kernel_distill.io import load_distilled
    from kernel_distill.results import append_record, make_record

    run = pathlib.Path(args.run)
    kip_record = json.loads((run / "results.json").read_text())
    config = kip_record["config"]
    dataset, per_class = config["dataset"], config["per_class"]
    train = ["--model", "evalnet", "--seeds", str(args.seeds), "--steps", str(args.train_steps), "--batch-size",
             str(args.batch_size)]
    sets = [] if args.no_kip else [(args.name, str(run / "distilled_best.npz"))]
    sets += [tuple(item.split("=", 1)) for item in args.compare]
    if not args.no_natural:
        sets.append(("natural", None))
    for name, path in sets:
        if path is None:
            zca = ["--zca", "--zca-reg", str(config["zca_reg"])] if config["zca"] else []
            krr = cli("baseline", "--dataset", dataset, "--per-class", str(per_class), "--seeds", "1",
                      "--kernel", "convnet-rf" if config["kernel"]["architecture"] == "convnet" else "convnet3-rf",
                      "--depth", str(config["kernel"]["depth"]),
                      "--rf-models", str(config["kernel"]["random_features"]["models"]),
                      "--rf-width", str(config["kernel"]["random_features"]["width"]),
                      "--rf-norm", config["kernel"]["random_features"].get("norm", "none"), *zca)
            krr_accuracy = krr["metrics"]["test_accuracy"]
            transfer = cli("transfer", "--dataset", dataset, "--natural-per-class", str(per_class), *zca, *train)
            kernel = krr["config"]["kernel"]
        else:
            meta = load_distilled(path).metadata
            evaluation = cli("evaluate", path, "--dataset", dataset)
            krr_accuracy = evaluation["metrics"]["test_accuracy"]
            transfer = cli("transfer", path, "--dataset", dataset, *train)
            kernel = meta.get("kernel")
        m = transfer["metrics"]
        metrics = dict(krr_test_accuracy=krr_accuracy, transfer_test_accuracy=m["test_accuracy"],
                       transfer_test_accuracy_std=m["test_accuracy_std"], num_test=m["num_test"])
        if args.exact_test_limit and path is not None and kernel and kernel.get("random_features"):
            exact = cli("evaluate", path, "--dataset", dataset, "--kernel", kernel["architecture"], "--depth",
                        str(kernel["depth"]), "--get", "nngp", "--test-limit", str(args.exact_test_limit))
            metrics.update(exact_krr_test_accuracy=exact["metrics"]["test_accuracy"],
                           exact_krr_num_test=exact["metrics"]["num_test"])
        is_run = name == args.name and not args.no_kip
        if is_run:
            metrics.update(kip_wall_seconds=kip_record["provenance"]["wall_seconds"],
                           kip_steps=kip_record["metrics"]["steps"], kip_best_step=kip_record["metrics"]["best_step"])
        record = make_record("benchmark/rf_distillation", name, transfer["dataset"], metrics,
                             dict(set=name, file=path, per_class=per_class, kernel=kernel, model="evalnet",
                                  train=transfer["config"]["train"], seeds=args.seeds,
                                  kip_command=kip_record["provenance"].get("command_line"),
                                  kip_config=config if is_run else None),
                             wall_seconds=transfer["provenance"]["wall_seconds"])
        append_record(args.results, record)
        print(f"{dataset} {per_class}/class {name}: KRR {100 * krr_accuracy:.2f}%, evalnet "
              f"{100 * m['test_accuracy']:.2f} +- {100 * m['test_accuracy_std']:.2f}% ({args.seeds} seeds)", flush=True)


if __name__ == "__main__":
    main()
