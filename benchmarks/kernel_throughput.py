"""Kernel throughput (image pairs per second) and peak memory: kernel-distill against neural-tangents 0.6.5.

Each measurement runs in a fresh subprocess (so peak memory is its own) on the same seeded inputs:

* ``ours``: ``kernel_distill.kernels.make_kernel_fn`` (this venv's JAX);
* ``nt``: neural-tangents 0.6.5's ``stax`` kernel of the same network, run by ``--nt-python`` (a separate
  virtualenv with ``jax==0.5.3 jaxlib==0.5.3 neural-tangents==0.6.5``, see ``tools/make_goldens.py``).

Both compute the NTK (which includes the NNGP) of the KIP networks: FC depth 1 and ConvNet depth 3 with
the prepended conv. The work per pair and the machine's limits come from XLA's own cost analysis of our
compiled kernel (flops, bytes accessed) and from a measured float32 matmul rate and copy bandwidth.

    .venv/bin/python benchmarks/kernel_throughput.py --nt-python /tmp/ntvenv/bin/python
    .venv/bin/python benchmarks/kernel_throughput.py --impls ours   # no neural-tangents (e.g. on a GPU)
    .venv/bin/python benchmarks/kernel_throughput.py --impls ours --label before --code /tmp/before  # a refactor:
    .venv/bin/python benchmarks/kernel_throughput.py --impls ours --label after  # before/after, same session
    .venv/bin/python benchmarks/tables.py                            # regenerate docs/BENCHMARKS.md

Each measurement appends a result record to benchmarks/results/kernel_throughput.jsonl (with the 1-minute
load average: the timings are the fastest of ``--repeats`` runs, but a busy machine still slows them).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

# JAX grabs 75% of a GPU's memory at start-up by default; the driver and each worker must not.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHAPES = {"28x28x1": (28, 28, 1), "32x32x3": (32, 32, 3)}
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "kernel_throughput.jsonl"
# (n1, n2) per architecture: enough pairs for a stable timing, small enough for neural-tangents' memory.
SIZES = {"fc": (2000, 2000), "convnet": (8, 16)}


def _sizes() -> dict:
    """SIZES, with the ConvNet's overridable as KD_BENCH_CONV_SIZE="n1,n2" (a GPU wants more pairs)."""
    sizes = dict(SIZES)
    if os.environ.get("KD_BENCH_CONV_SIZE"):
        sizes["convnet"] = tuple(int(v) for v in os.environ["KD_BENCH_CONV_SIZE"].split(","))
    return sizes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(shape, n1, n2, dtype):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((n1, *shape)).astype(dtype), rng.standard_normal((n2, *shape)).astype(dtype)


def _nt_kernel_fn(arch):
    import neural_tangents  # noqa: F401
    from neural_tangents import stax

    w, b = 2**0.5, 0.1
    if arch == "fc":
        layers = [stax.Flatten(), stax.Dense(1, w, b), stax.Relu(), stax.Dense(1, w, b)]
    else:
        def conv():
            return stax.Conv(1, (3, 3), padding="SAME", W_std=w, b_std=b)
        layers = [conv(), stax.Relu()]
        for _ in range(3):
            layers += [conv(), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2))]
        layers += [stax.Flatten(), stax.Dense(1, w, b)]
    _, _, kernel_fn = stax.serial(*layers)
    return lambda a, c: kernel_fn(a, c, "ntk")


def timed_kernel_fn(arch: str):
    """Our kernel function as this benchmark times it: FC depth 1 or ConvNet depth 3, the memory budget
    ``KD_BENCH_BUDGET_MB`` (default 512 MB). benchmarks/compiled_programs.py compiles the same one."""
    from kernel_distill.kernels import make_kernel_fn

    budget_mb = float(os.environ.get("KD_BENCH_BUDGET_MB", "512"))
    return make_kernel_fn(architecture=arch, depth=1 if arch == "fc" else 3, memory_budget_bytes=int(budget_mb * 2**20))


def worker(impl, arch, shape_name, dtype_name, repeats):
    import jax

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    import numpy as np

    n1, n2 = _sizes()[arch]
    x1, x2 = _inputs(SHAPES[shape_name], n1, n2, np.dtype(dtype_name))
    if impl == "ours":
        kernel_fn = timed_kernel_fn(arch)
        fn = jax.jit(lambda a, c: kernel_fn(a, c, get="ntk"))
    else:
        fn = jax.jit(_nt_kernel_fn(arch))
    x1, x2 = jax.device_put(x1), jax.device_put(x2)
    rss_before = _rss_mb()
    fn(x1, x2).block_until_ready()  # compile + warm up
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(x1, x2).block_until_ready()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = float(np.min(times))  # the least disturbed run: the CPU may be shared
    # CPU seconds (all threads of this process) barely move when other processes share the cores, so
    # the ours / neural-tangents ratio is also given per CPU second.
    cpu_seconds = float(np.min(cpu_times))
    result = dict(impl=impl, arch=arch, shape=shape_name, dtype=dtype_name, n1=n1, n2=n2, seconds=seconds,
                  pairs_per_second=n1 * n2 / seconds, pairs_per_cpu_second=n1 * n2 / cpu_seconds,
                  cpu_seconds=cpu_seconds, peak_extra_mb=_peak_rss_mb() - rss_before,
                  load_average=os.getloadavg()[0], budget_mb=float(os.environ.get("KD_BENCH_BUDGET_MB", "512")),
                  backend=jax.default_backend(), device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        result["peak_device_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    if impl == "ours":
        result["flops_per_pair"], result["bytes_per_pair"] = _work_per_pair(arch, x1[:4], x2[:8])
    print(json.dumps(result))


def _work_per_pair(arch, x1, x2):
    """XLA's flop and byte counts of one untiled block, per pair (a loop body would be counted only once)."""
    import jax
    import numpy as np

    from kernel_distill import kernels

    spec = kernels.KernelSpec(architecture=arch)
    if arch == "fc":
        # The FC kernel is a Gram matrix (2 d flops per pair) plus a few dozen elementwise flops; its
        # bytes per pair depend on how rows are reused across the whole matrix, so none are claimed.
        d = int(np.prod(x1.shape[1:]))
        return 2.0 * d + 40.0, 0.0
    s1, s2 = kernels.self_stats(spec, x1), kernels.self_stats(spec, x2)
    partner = kernels.partner_arrays(spec, x2, s2)
    block = jax.jit(lambda a, sa, p: kernels.kernel_block_from_partner(spec, a, sa, p, "ntk"))
    cost = block.lower(x1, s1, partner).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    pairs = len(x1) * len(x2)
    return float(cost.get("flops", 0)) / pairs, float(cost.get("bytes accessed", 0)) / pairs


def machine_limits():
    """Measured float32 matmul rate (GFLOP/s) and large-array copy bandwidth (GB/s) through this JAX."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda m: m @ m)
    mm(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        mm(a).block_until_ready()
    gflops = 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
    copy = jax.jit(lambda v: v * 1.0001 + 1.0)
    copy(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        copy(big).block_until_ready()
    gbps = 5 * 2 * big.nbytes / (time.perf_counter() - start) / 1e9
    return gflops, gbps


def _commit_of(code) -> str | None:
    """The commit of the checkout timed (``--code``, else this one)."""
    folder = pathlib.Path(code) if code else pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _record(path, r, gflops, gbps, label=None, code=None):
    """One result record per measurement (benchmarks/tables.py renders docs/BENCHMARKS.md from them)."""
    from kernel_distill.results import append_record, make_record

    metrics = dict(pairs_per_second=r["pairs_per_second"], seconds=r["seconds"], peak_extra_mb=r["peak_extra_mb"],
                   pairs_per_cpu_second=r["pairs_per_cpu_second"], cpu_seconds=r["cpu_seconds"],
                   machine_gflops=gflops, machine_gbps=gbps, load_average=r["load_average"])
    for key in ("flops_per_pair", "bytes_per_pair", "peak_device_mb"):
        if key in r:
            metrics[key] = r[key]
    impl = "ours" if r["impl"] == "ours" else "neural-tangents"
    config = dict(network=r["arch"], input=r["shape"], dtype=r["dtype"], impl=impl, n1=r["n1"], n2=r["n2"],
                  depth=1 if r["arch"] == "fc" else 3, memory_budget_mb=r.get("budget_mb"),
                  other_jax=r["jax"] if impl != "ours" else None)
    if label:
        config.update(label=label, code_commit=_commit_of(code))
    record = make_record("benchmark/kernel_throughput", impl, dict(name="synthetic", checksums={}), metrics, config,
                         dtype=r["dtype"], wall_seconds=r["seconds"])
    append_record(path, record)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["ours", "nt"], choices=["ours", "nt"])
    parser.add_argument("--nt-python", default="/tmp/ntvenv/bin/python")
    parser.add_argument("--archs", nargs="+", default=["fc", "convnet"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS), help="append result records here")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("--label", default=None,
                        help="e.g. 'before' or 'after': records go to the before/after table, not the main one")
    parser.add_argument("--code", default=None,
                        help="a kernel-distill checkout whose src/ the 'ours' workers import (default: this one)")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "ARCH", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, repeats=args.repeats)
        return

    import jax

    gflops, gbps = machine_limits()
    print(f"# kernel throughput, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {jax.default_backend()} {jax.devices()[0].device_kind}; measured limits: "
          f"{gflops:.0f} GFLOP/s float32 matmul, {gbps:.1f} GB/s copy")
    print("| network | input | dtype | impl | pairs/s | peak extra MB | GFLOP/s (share of matmul peak) "
          "| GB/s (share of copy bandwidth) |")
    print("|---|---|---|---|---|---|---|---|")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    if args.code:  # time another checkout's kernels with this venv's JAX
        env["PYTHONPATH"] = str(pathlib.Path(args.code).resolve() / "src")
    work = {}
    for arch in args.archs:
        for shape in args.shapes:
            for dtype in args.dtypes:
                for impl in args.impls:
                    python = sys.executable if impl == "ours" else args.nt_python
                    cmd = [python, __file__, "--worker", impl, arch, shape, dtype, "--repeats", str(args.repeats)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                    if proc.returncode != 0 or not lines:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                        print(f"| {arch} | {shape} | {dtype} | {impl} | failed: {tail} | | | |", flush=True)
                        continue
                    r = json.loads(lines[-1])
                    if impl == "ours":
                        work[(arch, shape, dtype)] = (r["flops_per_pair"], r["bytes_per_pair"])
                    flops, bytes_ = work.get((arch, shape, dtype), (0.0, 0.0))
                    achieved_gflops = flops * r["pairs_per_second"] / 1e9
                    achieved_gbps = bytes_ * r["pairs_per_second"] / 1e9
                    mem = r.get("peak_device_mb", r["peak_extra_mb"])
                    print(f"| {arch} | {shape} | {dtype} | {impl} | {r['pairs_per_second']:,.0f} | {mem:,.0f} | "
                          f"{achieved_gflops:.1f} ({100 * achieved_gflops / gflops:.1f}%) | "
                          f"{achieved_gbps:.1f} ({100 * achieved_gbps / gbps:.0f}%) |", flush=True)
                    if not args.no_record:
                        _record(args.results, r, gflops, gbps, args.label, args.code)


if __name__ == "__main__":
    main()
