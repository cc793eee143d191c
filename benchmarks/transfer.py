"""Transfer: finite networks trained on KIP-FC sets, Label Solve sets and natural subsets of the same size.

For each dataset and images-per-class, makes (or reuses, if its folder exists) a KIP-FC set with learned
labels and a Label Solve set (FC NTK, whole training set), then trains each finite model with ``--seeds``
seeds on: the KIP set, the LS set, and a random natural class-balanced subset; prints test accuracy
(mean +- std over the seeds, whole test set) and the training time per seed.

Every finished cell's result record (docs/FORMAT.md) is appended to ``--results`` (default
``benchmarks/results/transfer.jsonl``), from
which ``benchmarks/tables.py`` makes the tables of docs/BENCHMARKS.md, and the cell itself to the cache
``OUT/results.jsonl``; a rerun skips the cells already there, so a long
table can be built over several sessions or stopped with Ctrl-C. ``--jobs 2`` trains two cells at once
(one JAX process keeps only ~1.1 cores busy on a 2-core machine). ``--table-only`` prints what is cached.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/transfer.py \\
        --datasets mnist fashion_mnist --per-class 1 10 50 --models evalnet fc --train-steps 300 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import time

from _cli import CommandFailed, cli  # benchmarks/ is on sys.path when a script runs
from kernel_distill.finite import MODELS, build_model, default_learning_rate
from kernel_distill.results import append_record, read_results

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "transfer.jsonl"

SOURCES = ("kip", "ls", "natural")


def make_sets(root: pathlib.Path, name: str, per_class: int, kip_steps: int, kip_select_on: str = "validation") -> None:
    kip_dir = root / f"{name}-kip-{per_class}"
    if not (kip_dir / "distilled.npz").is_file():
        # One evaluation, at the last step: the set used is the final support whichever split kip "selects" on;
        # --kip-select-on test only makes all training images targets (no validation split held out).
        # depth 1 and 5,000 targets: the recipe of these rows (kip's defaults since 2026-12-07 differ)
        cli("kip", "--dataset", name, "--per-class", str(per_class), "--learn-labels", "--steps", str(kip_steps),
            "--depth", "1", "--target-batch", "5000",
            "--eval-every", str(kip_steps), "--select-on", kip_select_on, "--out", str(kip_dir))
    ls_dir = root / f"{name}-ls-{per_class}"
    if not (ls_dir / "distilled.npz").is_file():
        cli("label-solve", "--dataset", name, "--support-size", str(10 * per_class), "--out", str(ls_dir))


def cell_key(cell: dict) -> tuple:
    return tuple(cell[k] for k in ("dataset", "per_class", "model", "width", "source", "steps", "lr", "batch_size",
                                   "loss", "seeds"))


def run_cell(root: pathlib.Path, cell: dict, results_path=RESULTS) -> dict:
    set_dir = root / f"{cell['dataset']}-{cell['source']}-{cell['per_class']}"
    if cell["source"] == "natural":
        source = ("--natural-per-class", str(cell["per_class"]), "--dataset", cell["dataset"])
    else:
        source = (str(set_dir / "distilled.npz"),)
    try:
        r = cli("transfer", *source, "--model", cell["model"], "--width", str(cell["width"]), "--steps",
                str(cell["steps"]), "--lr", str(cell["lr"]), "--batch-size", str(cell["batch_size"]), "--loss",
                cell["loss"], "--seeds", str(cell["seeds"]), "--eval-every", str(cell["steps"]))
    except CommandFailed as e:  # e.g. a diverged training: record it, keep going
        return dict(cell, error="diverged" if "became nan" in str(e) else str(e)[-200:])
    m = r["metrics"]
    train_seconds = m["train_seconds"] / cell["seeds"]
    # The set's own KRR accuracy, beside its transfer (KIP: its final support, distilled.npz, is the one used).
    krr = make_seconds = None
    if cell["source"] != "natural":
        set_record = read_results(set_dir)
        set_metrics = set_record["metrics"]
        krr = set_metrics.get("test_accuracy_final", set_metrics["test_accuracy"])
        make_seconds = set_record["provenance"].get("wall_seconds")  # the compute that made the set
    set_name = {"kip": "kip-fc"}.get(cell["source"], cell["source"])
    append_record(results_path, dict(r, config=dict(r["config"], set=set_name,
                                                    per_class=cell["per_class"], loss=cell["loss"], steps=cell["steps"],
                                                    batch_size=cell["batch_size"], learning_rate=cell["lr"]),
                                     metrics=dict(m, train_seconds_per_seed=train_seconds,
                                                  **({"set_krr_test_accuracy": krr} if krr is not None else {}),
                                                  **({"make_seconds": make_seconds} if make_seconds else {}))))
    return dict(cell, mean=m["test_accuracy"], std=m["test_accuracy_std"], accuracies=m["test_accuracies"],
                train_seconds_per_seed=train_seconds)


def print_table(results: dict, cells: list[dict]) -> None:
    print("| dataset | per class | model | KIP-FC set % | LS set % | natural % | train s / seed (KIP, LS, nat.) |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for cell in cells:
        rows.setdefault((cell["dataset"], cell["per_class"], f"{cell['model']}-{cell['width']}"), []).append(cell)
    for (name, per_class, model), row in rows.items():
        accs, secs = [], []
        for cell in row:
            r = results.get(cell_key(cell))
            if r is None:
                accs.append("-")
                secs.append("-")
            elif "error" in r:
                accs.append(r["error"] if r["error"] == "diverged" else "failed")
                secs.append("-")
            else:
                accs.append(f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}")
                secs.append(f"{r['train_seconds_per_seed']:.0f}")
        print(f"| {name} | {per_class} | {model} | {' | '.join(accs)} | {', '.join(secs)} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--kip-steps", type=int, default=2000)
    parser.add_argument("--kip-select-on", choices=("validation", "test"), default="validation",
                        help="kip's --select-on for the KIP sets; they are evaluated at their last step only and "
                             "the final support is used, so this chooses nothing: test makes all training images "
                             "targets, as the rows of commit c979632 (made before kip held out a validation split)")
    parser.add_argument("--models", nargs="+", default=["evalnet", "fc"], choices=MODELS)
    parser.add_argument("--width", type=int, default=None, help="model width (default: 1024 fc, 128 conv)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="default: the CLI's per-model default")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loss", choices=("mse", "ce"), default="mse")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at once")
    parser.add_argument("--table-only", action="store_true", help="print the cached results, train nothing")
    parser.add_argument("--out", default="runs/bench-transfer")
    parser.add_argument("--results", default=str(RESULTS), help="append each cell's result record here")
    args = parser.parse_args()
    root = pathlib.Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.jsonl"
    results = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            results[cell_key(r)] = r
    cells = [dict(dataset=name, per_class=per_class, model=model, width=args.width or build_model(model, 10).width,
                  source=source, steps=args.train_steps, lr=args.lr or default_learning_rate(model),
                  batch_size=args.batch_size, loss=args.loss,
                  seeds=args.seeds)
             for name in args.datasets for per_class in args.per_class for model in args.models
             for source in SOURCES]
    print(f"# transfer to finite networks, {time.strftime('%Y-%m-%d')}; {args.train_steps} steps, SGD momentum "
          f"0.9, lr {args.lr or 'per model'} cosine, batch {args.batch_size}, weight decay 5e-4, {args.loss} "
          f"loss on the set's labels, {args.seeds} seeds, {args.jobs} job(s) at once")
    if not args.table_only:
        for name in args.datasets:
            for per_class in args.per_class:
                make_sets(root, name, per_class, args.kip_steps, args.kip_select_on)
        # The small sets first, so that an interrupted run has whole rows to show.
        todo = sorted((cell for cell in cells if cell_key(cell) not in results), key=lambda c: c["per_class"])
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for future in concurrent.futures.as_completed([pool.submit(run_cell, root, c, args.results) for c in todo]):
                r = future.result()
                results[cell_key(r)] = r
                with results_file.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                outcome = r["error"] if "error" in r else f"{100 * r['mean']:.2f}%"
                print(f"done: {r['dataset']} {r['per_class']}/class {r['model']} {r['source']}: {outcome}",
                      flush=True)
    print_table(results, cells)


if __name__ == "__main__":
    main()
