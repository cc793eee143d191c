"""ConvNet-kernel KIP step time and Label-Solve throughput: local backend vs 1, 2, ... Ray workers.

For each backend the same KIP step (same support, same key, same target batch) is compiled by one warm-up
step and then timed over ``--steps`` steps; Label Solve is timed over a training subset after a warm-up
pass. For Ray the step is also split into worker compute (the slowest worker, forward and backward), driver
compute (KRR-loss VJP, statistics VJP) and the rest, Ray's overhead (scheduling, serialisation, transfers),
and the bytes sent and received per step are counted. Each backend appends one record to
``--results`` (default ``benchmarks/results/distributed.jsonl``); ``benchmarks/tables.py`` makes the table
of docs/BENCHMARKS.md. The 1-minute load average before and after each measurement is in the record: on a
shared machine the other processes' load changes the numbers.

    KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/distributed.py \
        --dataset mnist --per-class 1 --target-batch 20 --steps 3 --workers 1 2

The local backend's XLA spreads one ConvNet kernel over every core of the machine (1.8 of this machine's 2
cores, measured as process CPU time over wall time, recorded as ``driver_cores_used``), so on a 2-core machine
two workers have almost nothing left to add. ``--cores-per-process 1`` pins the local run and each Ray worker
to its own single core (Linux CPU affinity of every thread), which measures how the work divides between
workers, what a machine with a core (or a GPU) per worker gets:

    ... benchmarks/distributed.py --dataset mnist --per-class 1 --target-batch 20 --steps 3 --workers 1 2 \
        --cores-per-process 1
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill import kip
from kernel_distill.data import prepare_dataset
from kernel_distill.distributed import LocalBackend
from kernel_distill.kernels import KernelSpec, make_kernel_fn
from kernel_distill.label_solve import solve_labels
from kernel_distill.preprocess import centered_one_hot
from kernel_distill.results import append_record, dataset_record, make_record

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "distributed.jsonl"


def load() -> float:
    return os.getloadavg()[0]


def pin_threads(cores) -> None:
    """Restrict every thread of this process (XLA's pool included) to ``cores`` (Linux only)."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), set(cores))


def pin_workers(backend, cores_per_process: int) -> None:
    """Pin Ray worker ``i`` to cores ``[i * c, (i + 1) * c)`` (modulo the machine's cores)."""
    import ray

    count = os.cpu_count()

    def pin(actor, cores):  # runs inside the actor's process
        pin_threads(cores)

    ray.get([actor.__ray_call__.remote(pin, [(i * cores_per_process + j) % count for j in range(cores_per_process)])
             for i, actor in enumerate(backend.actors)])


def time_kip(backend, config, data, steps: int) -> dict:
    kernel_fn = make_kernel_fn(config.kernel, memory_budget_bytes=int(config.memory_budget_mb * 2**20))
    optimizer = kip.make_optimizer(config)
    per_class_target = kip.check_feasible(config, data)
    table, counts = kip.class_index_table(data.y_train, data.num_classes)
    state = kip.initial_state(config, data, optimizer)
    params = kip._state_params(state, config)
    opt_state = optimizer.init(params)
    key, fixed = jnp.asarray(state.key), jnp.asarray(state.labels)
    x_train = jnp.asarray(data.x_train)
    y_train = jnp.asarray(centered_one_hot(data.y_train, data.num_classes))
    if isinstance(backend, LocalBackend):
        step = kip.make_step(kernel_fn, config, optimizer, jnp.asarray(table), jnp.asarray(counts), per_class_target)
    else:
        step = kip.make_backend_step(backend, kernel_fn, config, optimizer, jnp.asarray(table), jnp.asarray(counts),
                                     per_class_target, backend.put(np.asarray(data.x_train, config.dtype)))
    started = time.perf_counter()
    params, opt_state, key, loss = step(params, opt_state, key, fixed, x_train, y_train)
    float(loss)
    warmup = time.perf_counter() - started
    times, parts = [], []
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(steps):
        started = time.perf_counter()
        params, opt_state, key, loss = step(params, opt_state, key, fixed, x_train, y_train)
        float(loss)
        times.append(time.perf_counter() - started)
        parts.append(dict(getattr(backend, "last_step", {}) or {}))
    driver_cores = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
    out = dict(kip_step_seconds=statistics.median(times), kip_step_seconds_all=times, kip_warmup_seconds=warmup,
               driver_cores_used=driver_cores,
               kip_pairs_per_step=(per_class_target * data.num_classes + config.per_class * data.num_classes)
               * config.per_class * data.num_classes, final_loss=float(loss))
    if parts and parts[0]:
        worker = [p["forward_seconds"] + p["backward_seconds"] for p in parts]
        driver = [p["driver_seconds"] for p in parts]
        out.update(worker_compute_seconds=statistics.median(worker), driver_seconds=statistics.median(driver),
                   ray_overhead_ms=1000 * statistics.median(t - w - d for t, w, d in zip(times, worker, driver)),
                   bytes_sent_per_step=parts[-1]["bytes_sent"], bytes_received_per_step=parts[-1]["bytes_received"])
    return out


def time_label_solve(backend, kernel_fn, data, support_size: int, train: int, block: int) -> dict:
    x_support = np.asarray(data.x_train[:support_size])
    x_train = np.asarray(data.x_train[support_size:support_size + train])
    y_train = centered_one_hot(data.y_train[support_size:support_size + train], data.num_classes)
    chosen = None if isinstance(backend, LocalBackend) else backend
    warm = block * getattr(backend, "num_workers", 1)  # one block per worker: each compiles its kernel
    solve_labels(kernel_fn, x_support, x_train[:warm], y_train[:warm], block_size=block, progress=False,
                 backend=chosen)
    started = time.perf_counter()
    solve_labels(kernel_fn, x_support, x_train, y_train, block_size=block, progress=False, backend=chosen)
    seconds = time.perf_counter() - started
    # the solve also computes K_ss here (support_size^2 pairs) besides the support x train blocks
    pairs = support_size * train + support_size ** 2
    return dict(label_solve_seconds=seconds, label_solve_pairs_per_second=pairs / seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--kernel", default="convnet")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--target-batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed KIP steps after one warm-up step")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="Ray worker counts to time")
    parser.add_argument("--no-local", action="store_true", help="skip the local backend")
    parser.add_argument("--ls-support", type=int, default=10)
    parser.add_argument("--ls-train", type=int, default=100)
    parser.add_argument("--ls-block", type=int, default=25)
    parser.add_argument("--results", default=str(RESULTS), help="append each backend's record here")
    parser.add_argument("--cores-per-process", type=int, default=None,
                        help="pin the local run and each Ray worker to this many cores of its own (Linux)")
    args = parser.parse_args()
    all_cores = sorted(os.sched_getaffinity(0))

    from kernel_distill.distributed.ray_backend import RayBackend

    config = kip.KipConfig(dataset=args.dataset, per_class=args.per_class, kernel=KernelSpec(args.kernel, args.depth),
                           learn_labels=True, target_batch_size=args.target_batch, steps=1)
    data = kip.prepare_for(config, progress=False)
    data_small = prepare_dataset(args.dataset, progress=False, val_size=0, test_limit=10)
    kernel_fn = make_kernel_fn(config.kernel)
    backends = ([("local", 1)] if not args.no_local else []) + [("ray", w) for w in args.workers]
    print(f"# {args.kernel} depth {args.depth} NTK, {args.dataset}, support {config.per_class * data.num_classes}, "
          f"target batch {args.target_batch}; {jax.default_backend()}, {os.cpu_count()} CPUs")
    print("| backend | workers | KIP step s | speed-up | worker compute s | Ray overhead ms | sent/step | "
          "received/step | LS pairs/s | load 1 min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    baseline = None
    for name, workers in backends:
        load_before = load()
        if args.cores_per_process:  # the local run (and the Ray driver) on the first cores only
            pin_threads(all_cores[:args.cores_per_process])
        backend = LocalBackend() if name == "local" else RayBackend.start(workers=workers)
        try:
            if args.cores_per_process and name == "ray":
                pin_workers(backend, args.cores_per_process)
            metrics = time_kip(backend, config, data, args.steps)
            metrics.update(time_label_solve(backend, kernel_fn, data_small, args.ls_support, args.ls_train,
                                            args.ls_block))
        finally:
            backend.close()
        metrics.update(load_before=load_before, load_after=load())
        if name == "local":
            baseline = metrics["kip_step_seconds"]
        metrics["speedup_vs_local"] = baseline / metrics["kip_step_seconds"] if baseline else None
        run_config = dict(backend=name, workers=workers, kernel=config.kernel.to_dict(), per_class=args.per_class,
                          target_batch=args.target_batch, steps=args.steps, ls_support=args.ls_support,
                          ls_train=args.ls_train, ls_block=args.ls_block, cores_per_process=args.cores_per_process)
        record = make_record("benchmark/distributed", f"{name}-{workers}",
                             dataset_record(data.name, data.checksums, num_train=len(data.y_train)),
                             {k: v for k, v in metrics.items() if v is not None}, run_config,
                             dtype="float32", argv=["benchmarks/distributed.py", *os.sys.argv[1:]])
        append_record(args.results, record)
        m = metrics
        fmt = (lambda k, f: f.format(m[k]) if k in m else "-")
        print(f"| {name} | {workers} | {m['kip_step_seconds']:.2f} | "
              f"{m['speedup_vs_local']:.2f}x | " if m["speedup_vs_local"] else f"| {name} | {workers} | "
              f"{m['kip_step_seconds']:.2f} | - | ", end="")
        print(f"{fmt('worker_compute_seconds', '{:.2f}')} | {fmt('ray_overhead_ms', '{:.0f}')} | "
              f"{fmt('bytes_sent_per_step', '{:,}')} | {fmt('bytes_received_per_step', '{:,}')} | "
              f"{m['label_solve_pairs_per_second']:.1f} | {load_before:.1f} -> {m['load_after']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
