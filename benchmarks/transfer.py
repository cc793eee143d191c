"""Transfer: finite networks trained on KIP-FC sets, Label Solve sets and natural subsets of the same size.

For each dataset and images-per-class, makes (or reuses, if its folder exists) a KIP-FC set with learned
labels and a Label Solve set, then trains each finite model for ``--train-steps`` steps with 3 seeds on:
the KIP set, the LS set, and a random natural subset; prints test accuracy mean +- std and training time.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/transfer.py \
        --datasets mnist fashion_mnist --per-class 1 10 --kip-steps 2000 --models fc convnet
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time


def cli(*args) -> dict:
    cmd = [sys.executable, "-m", "kernel_distill.cli", *args, "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--kip-steps", type=int, default=2000)
    parser.add_argument("--models", nargs="+", default=["fc", "convnet"])
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=None, help="model width (default: 1024 fc, 128 conv)")
    parser.add_argument("--out", default="runs/bench-transfer")
    args = parser.parse_args()
    root = pathlib.Path(args.out)
    print(f"# transfer to finite networks, {time.strftime('%Y-%m-%d')}; {args.train_steps} steps, SGD momentum "
          f"0.9 lr 0.05 cosine, weight decay 5e-4, MSE on the set's labels, {args.seeds} seeds")
    print("| dataset | per class | model | KIP-FC set % | LS set % | natural % | train s (all 3 sets) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        for per_class in args.per_class:
            kip_dir = root / f"{name}-kip-{per_class}"
            if not (kip_dir / "distilled.npz").is_file():
                cli("kip", "--dataset", name, "--per-class", str(per_class), "--learn-labels", "--steps",
                    str(args.kip_steps), "--eval-every", str(args.kip_steps), "--out", str(kip_dir))
            ls_dir = root / f"{name}-ls-{per_class}"
            if not (ls_dir / "distilled.npz").is_file():
                cli("label-solve", "--dataset", name, "--support-size", str(10 * per_class), "--out", str(ls_dir))
            for model in args.models:
                common = ["--model", model, "--steps", str(args.train_steps), "--seeds", str(args.seeds),
                          "--eval-every", str(args.train_steps)]
                if args.width:
                    common += ["--width", str(args.width)]
                runs = [(str(kip_dir / "distilled.npz"),), (str(ls_dir / "distilled.npz"),),
                        ("--natural-per-class", str(per_class), "--dataset", name)]
                cells, seconds = [], 0.0
                for source in runs:
                    try:
                        r = cli("transfer", *source, *common)
                    except RuntimeError as e:  # e.g. a diverged training: report it, keep going
                        cells.append("diverged" if "became nan" in str(e) else "failed")
                        continue
                    cells.append(f"{100 * r['mean']:.2f} +- {100 * r['std']:.2f}")
                    seconds += r["seconds"]
                print(f"| {name} | {per_class} | {model} | {' | '.join(cells)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
