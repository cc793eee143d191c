"""Where the exact ConvNet kernel spends its time: forward and VJP throughput, and the forward with one
operator at a time replaced by a trivial one of the same shapes.

Variants (ConvNet depth 3 NTK, the kernel of ``make_kernel_fn``, default tiles):

* ``forward``: the kernel as it is;
* ``forward, ReLU -> scale``: the arc-cosine ReLU (square root, ``asin`` polynomial) replaced by ``k / 2``;
* ``forward, box filter -> identity``: the 3x3 conv's box filter skipped;
* ``forward, pool -> slice``: the 2x2 average pool replaced by a strided slice of the right shape;
* ``VJP x1`` / ``VJP x2``: ``kernels.kernel_matrix_vjp`` with respect to one side (forward recomputed
  inside, as in a KIP step), plus the statistics' VJP.

A variant whose time barely moves from ``forward`` is not what bounds the kernel. Each variant runs in the
same process, after a warm-up, fastest of ``--repeats``; a record per variant goes to
benchmarks/results/kernel_ablation.jsonl with the 1-minute load average.

    .venv/bin/python benchmarks/kernel_ablation.py --shape 28x28x1 --dtype float64
    .venv/bin/python benchmarks/tables.py
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "kernel_ablation.jsonl"
# 14x14 and 20x20: the same network on smaller band arrays (0.35 and 0.72 MB per float64 array, against 1.4 MB
# at 28x28), to see whether the cache size sets the rate per band entry.
SHAPES = {"14x14x1": (14, 14, 1), "20x20x1": (20, 20, 1), "28x28x1": (28, 28, 1), "32x32x3": (32, 32, 3)}
VARIANTS = ["forward", "forward, ReLU -> scale", "forward, box filter -> identity", "forward, pool -> slice",
            "VJP x1", "VJP x2"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="28x28x1")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--pairs", default="8,16", help="n1,n2 images (default 8,16, as kernel_throughput)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, metavar="VARIANT",
                        help="a subset of (quote each): " + "; ".join(VARIANTS))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from kernel_distill import kernels
    from kernel_distill.kernels import KernelSpec, exact, layer_plan, make_kernel_fn
    from kernel_distill.results import append_record, make_record

    n1, n2 = (int(v) for v in args.pairs.split(","))
    spec = KernelSpec("convnet", 3)
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((n1, *SHAPES[args.shape])), args.dtype)
    x2 = jnp.asarray(rng.standard_normal((n2, *SHAPES[args.shape])), args.dtype)
    cotangent = jnp.asarray(rng.standard_normal((n1, n2)), args.dtype)
    budget = make_kernel_fn(spec).tile_budget()

    def forward():
        kernel_fn = make_kernel_fn(spec)
        return jax.jit(lambda a, b: kernel_fn(a, b, get="ntk")), (x1, x2)

    def vjp(side: int):
        def fn(a, b, ct):
            sa, sb = kernels.tiled_self_stats(spec, a, budget), kernels.tiled_self_stats(spec, b, budget)
            wrt = (side == 1, side == 2)
            da, dsa, db, dsb = kernels.kernel_matrix_vjp(spec, a, sa, b, sb, ct, "ntk", budget, wrt)
            if side == 1:
                return da + kernels.tiled_self_stats_vjp(spec, a, dsa, budget)
            return db + kernels.tiled_self_stats_vjp(spec, b, dsb, budget)
        return jax.jit(fn), (x1, x2, cotangent)

    def pool_slice(k, out_plan):
        h, w, rh, rw = out_plan
        return k[..., :2 * rh + 1, :2 * rw + 1, :2 * h:2, :2 * w:2]

    replacements = {
        "forward": {},
        "forward, ReLU -> scale": {"relu_kernels": lambda c, s1, i1, s2, i2, ntk: (
            c * 0.5, None if ntk is None else ntk * 0.5)},
        "forward, box filter -> identity": {"_box3": lambda k: k},
        "forward, pool -> slice": {"_pool": pool_slice},
    }
    variants = [(name, forward, patch) for name, patch in replacements.items()]
    variants += [("VJP x1", lambda: vjp(1), {}), ("VJP x2", lambda: vjp(2), {})]
    wanted = args.variants
    variants = [v for v in variants if v[0] in wanted]
    # entries of every band state one pair passes through (summed over the layers' plans)
    band_entries = sum(h * w * (2 * rh + 1) * (2 * rw + 1)
                       for h, w, rh, rw in filter(None, layer_plan(spec.layers, *SHAPES[args.shape][:2])))
    for name, build, patch in variants:
        saved = {attr: getattr(exact, attr) for attr in patch}
        try:
            for attr, fn in patch.items():
                setattr(exact, attr, fn)
            fn, fn_args = build()
            jax.block_until_ready(fn(*fn_args))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                times.append(time.perf_counter() - start)
        finally:
            for attr, fn in saved.items():
                setattr(exact, attr, fn)
        seconds = min(times)
        load = os.getloadavg()[0]
        print(f"{args.shape} {args.dtype} {name}: {n1 * n2 / seconds:,.1f} pairs/s (load {load:.1f})", flush=True)
        record = make_record(
            "benchmark/kernel_ablation", "kernel_ablation", dict(name="synthetic", checksums={}),
            dict(pairs_per_second=n1 * n2 / seconds, seconds=seconds, load_average=load,
                 band_entries_per_pair=band_entries),
            dict(variant=name, architecture="convnet", depth=3, shape=args.shape, n1=n1, n2=n2,
                 repeats=args.repeats, tile_budget_bytes=budget),
            dtype=args.dtype, wall_seconds=sum(times))
        append_record(args.results, record)


if __name__ == "__main__":
    main()
