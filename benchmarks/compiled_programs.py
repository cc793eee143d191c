"""Are two checkouts' compiled programs the same? The optimized XLA program of each timed computation, with
the code before and after a refactor, compared after removing what only names it.

Timings on a shared CPU move by 10-20% between runs of the same code (docs/BENCHMARKS.md, the before/after
tables), more than the 5% a refactor may cost. A refactor that leaves the compiled program unchanged cannot
have changed its speed or its numbers, so this checks the programs themselves: for each computation that
``kernel_throughput.py`` and ``kip_step.py`` time (the NTK of the FC and ConvNet kernels at both input shapes
and dtypes, and the jitted ConvNet KIP step of the ``mnist-1`` case), the text of the program XLA compiles on
this machine, with instruction and computation names, source locations and metadata removed; its sha256, the
sha256 of its sorted lines (the same instructions, whatever their order) and its line count go into a record
per checkout.

    git worktree add --detach /tmp/before 3524578
    .venv/bin/python benchmarks/compiled_programs.py --label before --code /tmp/before
    .venv/bin/python benchmarks/compiled_programs.py --label after

The programs depend only on shapes and dtypes, so the inputs are zeros of the timed shapes (the KIP step's
training set has MNIST's 60,000 rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

from kernel_throughput import SHAPES, _sizes, timed_kernel_fn  # benchmarks/ is on sys.path when a script runs
from kip_step import CASES, build_step

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compiled_programs.jsonl"
KERNEL_CASES = [(arch, shape, dtype) for arch in ("fc", "convnet") for shape in ("28x28x1", "32x32x3")
                for dtype in ("float32", "float64")]

_METADATA = re.compile(r", metadata=\{[^}]*\}")
_STACK_FRAME = re.compile(r",? ?stack_frame_id=\d+")
_NUMBERED_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9-]*(\.\d+)+")
_MODULE_NAME = re.compile(r"^HloModule [^,]+,")  # jit_<the Python function's name>
_VALUE_NAME = re.compile(r"%[A-Za-z_0-9.#:-]+")


def normalized_program(hlo_text: str) -> str:
    """The compiled HLO module's text without what only names things: instruction and computation names
    (``fusion.12`` -> ``N``), metadata (source file, line, the Python function), the module's table of source
    locations. Instruction order is kept within a computation; computations are sorted, as their order in
    the text follows their names."""
    blocks = []
    for block in hlo_text.split("\n\n"):
        lines = []
        for line in block.splitlines():
            if "file_location_id" in line or "file_name_id" in line or re.match(r"^\s*\d+ \"", line):
                continue  # the stack-frame index: where each op came from in Python
            line = _MODULE_NAME.sub("HloModule M,", _STACK_FRAME.sub("", _METADATA.sub("", line)))
            lines.append(_VALUE_NAME.sub("%", _NUMBERED_NAME.sub("N", line)))
        if lines:
            blocks.append("\n".join(lines))
    return "\n\n".join(sorted(blocks))


def kernel_program(arch: str, shape: str, dtype: str) -> str:
    """kernel_throughput.py's NTK of ``arch`` on ``shape`` inputs (its ``n1 x n2`` pairs)."""
    import jax
    import jax.numpy as jnp

    kernel_fn = timed_kernel_fn(arch)
    x1, x2 = (jnp.zeros((n, *SHAPES[shape]), dtype) for n in _sizes()[arch])
    return jax.jit(lambda a, c: kernel_fn(a, c, get="ntk")).lower(x1, x2).compile().as_text()


def kip_step_program() -> str:
    """kip_step.py's ``mnist-1`` case: ConvNet NTK, 1 image per class, learned labels, 100 targets."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _, per_class, _ = CASES["mnist-1"]
    num_classes, num_train = 10, 60000
    y = np.arange(num_train) % num_classes
    step, optimizer = build_step("mnist-1", "convnet", y)
    labels = jnp.zeros((num_classes * per_class, num_classes), jnp.float32)
    params = {"images": jnp.zeros((num_classes * per_class, 28, 28, 1), jnp.float32), "labels": labels}
    args = (params, optimizer.init(params), jax.random.PRNGKey(0), labels,
            jnp.zeros((num_train, 28, 28, 1), jnp.float32), jnp.zeros((num_train, num_classes), jnp.float32))
    return step.lower(*args).compile().as_text()


def worker(dtype: str) -> None:
    """One process per dtype, as the timed workers run float64 with x64 on and float32 without."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    programs = {f"{arch} NTK {shape} {d}": (kernel_program, (arch, shape, d)) for arch, shape, d in KERNEL_CASES
                if d == dtype}
    if dtype == "float32":
        programs["ConvNet KIP step, mnist-1"] = (kip_step_program, ())
    for name, (make, args) in programs.items():
        start = time.perf_counter()
        text = normalized_program(make(*args))
        # the same instructions, maybe scheduled in another order (independent ones may swap places)
        instructions = "\n".join(sorted(text.splitlines()))
        print(json.dumps(dict(program=name, sha256=hashlib.sha256(text.encode()).hexdigest(),
                              instructions_sha256=hashlib.sha256(instructions.encode()).hexdigest(),
                              lines=text.count("\n") + 1, compile_seconds=time.perf_counter() - start,
                              jax=jax.__version__, backend=jax.default_backend())), flush=True)


def _commit_of(code: pathlib.Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=code).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", help="e.g. 'before' or 'after': which code is compiled")
    parser.add_argument("--code", type=pathlib.Path, default=None,
                        help="a kernel-distill checkout whose src/ is compiled (default: this one)")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--worker", choices=["float32", "float64"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.label:
        parser.error("--label is required (e.g. before or after)")
    code = (args.code or HERE.parent).resolve()
    if not (code / "src" / "kernel_distill").is_dir():
        raise SystemExit(f"{code} is not a kernel-distill checkout (no src/kernel_distill)")
    env = dict(os.environ, PYTHONPATH=str(code / "src"), PYTHONUNBUFFERED="1")
    from kernel_distill.results import append_record, make_record

    commit = _commit_of(code)
    for dtype in ("float32", "float64"):
        proc = subprocess.run([sys.executable, __file__, "--worker", dtype], env=env, stdout=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {dtype} worker failed (exit {proc.returncode}); its messages are above")
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            print(f"{args.label} {commit[:7]}  {r['program']:<32} {r['sha256'][:16]}  {r['lines']:,} lines "
                  f"({r['compile_seconds']:.0f} s)")
            append_record(args.results, make_record(
                "benchmark/compiled_programs", args.label, dict(name="none", checksums={}),
                dict(lines=r["lines"], compile_seconds=r["compile_seconds"]),
                dict(program=r["program"], sha256=r["sha256"], instructions_sha256=r["instructions_sha256"],
                     label=args.label, code=str(code), code_commit=commit, jax=r["jax"], backend=r["backend"]),
                wall_seconds=r["compile_seconds"]))


if __name__ == "__main__":
    main()
