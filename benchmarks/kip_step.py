"""Seconds per ConvNet-kernel KIP step (the jitted step: target sampling, kernels, gradients, Adam update).

The timing runs in a subprocess that uses only the API every kernel-distill version since 0.1.0 has
(``kip.make_step``), so the same script times an older checkout given by ``--code``:

    .venv/bin/python benchmarks/kip_step.py --case mnist-1 --label after
    git worktree add /tmp/before c979632
    .venv/bin/python benchmarks/kip_step.py --case mnist-1 --label before --code /tmp/before
    .venv/bin/python benchmarks/tables.py

The first call (compilation included) is reported apart from the steady-state steps. Each run appends a
result record to benchmarks/results/kip_step.jsonl, with the 1-minute load average (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "kip_step.jsonl"
CASES = {  # name: (dataset, support images per class, target batch)
    "mnist-1": ("mnist", 1, 100),
    "cifar10-10": ("cifar10", 10, 100),  # the lossy JPEG copy in ../shared/data (not comparable to papers)
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--label", required=True, help="e.g. 'before' or 'after': which code is timed")
    parser.add_argument("--steps", type=int, default=2,
                    help="steady-state steps timed after the first (0: only the first, for steps that take an hour)")
    parser.add_argument("--architecture", default="convnet")
    parser.add_argument("--data-dir", default=os.environ.get("KERNEL_DISTILL_DATA", "../shared/data"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--code", default=None, help="a kernel-distill checkout to time (default: this one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(time_steps(args)))
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.code:
        env["PYTHONPATH"] = str(pathlib.Path(args.code).resolve() / "src")
    argv = [sys.executable, __file__, "--worker", "--case", args.case, "--label", args.label, "--steps",
            str(args.steps), "--architecture", args.architecture, "--data-dir", args.data_dir]
    # The worker's stderr passes through: a CIFAR-10 step takes tens of minutes on a CPU, and its progress
    # lines (the first step's time as soon as it is known) survive a run stopped before the end.
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed (exit {proc.returncode}); its messages are above")
    r = json.loads(lines[-1])
    steady = f"then {r['seconds']:.1f} s per step (mean of {r['steps']})" if r["steps"] else "no steady-state step timed"
    print(f"{args.case} {args.label} ({r['code']}): first step {r['first']:.1f} s, {steady}, loss {r['loss']:.4g}, "
          f"load average {r['load']:.1f}")
    from kernel_distill.results import append_record, make_record

    record = make_record(
        "benchmark/kip_step", args.label, dict(name=r["dataset"], checksums={}),
        dict(seconds_per_step=r["seconds"], first_step_seconds=r["first"], steps_timed=r["steps"], loss=r["loss"],
             pairs_per_step=r["support"] ** 2 + r["targets"] * r["support"], load_average=r["load"]),
        dict(case=args.case, label=args.label, architecture=args.architecture, per_class=r["per_class"],
             support=r["support"], target_batch=r["targets"], learn_labels=True, code=args.code or "this checkout",
             code_commit=r["commit"]),
        wall_seconds=r["first"] + (r["seconds"] * r["steps"] if r["steps"] else 0.0))
    append_record(args.results, record)


def build_step(case: str, architecture: str, y: np.ndarray):
    """The jitted KIP step this benchmark times for ``case`` (learned labels), and its optimizer; ``y`` the
    training labels. benchmarks/compiled_programs.py compiles the same one."""
    import jax.numpy as jnp

    from kernel_distill import kip
    from kernel_distill.kernels import KernelSpec, make_kernel_fn

    dataset, per_class, target_batch = CASES[case]
    num_classes = int(y.max()) + 1
    config = kip.KipConfig(dataset=dataset, per_class=per_class, kernel=KernelSpec(architecture),
                           learn_labels=True, target_batch_size=target_batch)
    optimizer = kip.make_optimizer(config)
    table, counts = kip.class_index_table(y, num_classes)
    step = kip.make_step(make_kernel_fn(config.kernel), config, optimizer, jnp.asarray(table), jnp.asarray(counts),
                         target_batch // num_classes)
    return step, optimizer


def time_steps(args) -> dict:
    import jax
    import jax.numpy as jnp

    import kernel_distill
    from kernel_distill.data import load_dataset

    dataset, per_class, target_batch = CASES[args.case]
    x, y = load_dataset(dataset, "train", data_dir=args.data_dir)
    x = x.astype(np.float32) / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))  # per-channel standardisation
    num_classes = int(y.max()) + 1
    step, optimizer = build_step(args.case, args.architecture, y)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(num_classes)])
    labels = np.eye(num_classes, dtype=np.float32)[y[idx]] - 1.0 / num_classes
    params = {"images": jnp.asarray(x[idx]), "labels": jnp.asarray(labels)}
    state = (params, optimizer.init(params), jax.random.PRNGKey(0))
    x_train = jnp.asarray(x)
    y_train = jnp.asarray(np.eye(num_classes, dtype=np.float32)[y] - 1.0 / num_classes)

    def one_step(state):
        params, opt_state, key = state
        params, opt_state, key, loss = step(params, opt_state, key, jnp.asarray(labels), x_train, y_train)
        jax.block_until_ready(params)
        return (params, opt_state, key), float(loss)

    # the code being timed: read now, as a run of an hour may outlive the commit it started on
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=pathlib.Path(kernel_distill.__file__).parent).stdout.strip()
    start = time.perf_counter()
    state, loss = one_step(state)
    first = time.perf_counter() - start
    print(f"first step {first:.1f} s (compilation included), loss {loss:.4g}, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr, flush=True)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, loss = one_step(state)
        times.append(time.perf_counter() - start)
        print(f"step {i + 2}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    return dict(seconds=float(np.mean(times)) if times else None, first=first, steps=len(times), loss=loss, load=os.getloadavg()[0],
                dataset=dataset, per_class=per_class, support=per_class * num_classes, targets=target_batch,
                code=str(pathlib.Path(kernel_distill.__file__).parent), commit=commit)


if __name__ == "__main__":
    main()
