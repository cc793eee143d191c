"""Seconds for ``kernel-distill --help`` (and ``kernel-distill kip --help``), and whether it loaded JAX.

Each repeat is a fresh interpreter (what a user's shell starts), timed from spawn to exit. ``--code`` times
another checkout with the same interpreter and packages, so a before/after pair runs on one machine:

    .venv/bin/python benchmarks/cli_startup.py --label after
    git worktree add --detach /tmp/before 1a524e2     # the last commit before the workflow layer (issue 27)
    .venv/bin/python benchmarks/cli_startup.py --label before --code /tmp/before
    .venv/bin/python benchmarks/tables.py

Each run appends one record per command to benchmarks/results/cli_startup.jsonl, with the median and the
fastest of the repeats and the 1-minute load average (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cli_startup.jsonl"
COMMANDS = {"--help": ["--help"], "kip --help": ["kip", "--help"]}
# Runs the parser as the console script does, then reports whether JAX got imported on the way.
PROBE = ("import sys\nfrom kernel_distill.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "print('JAX_LOADED' if 'jax' in sys.modules else 'JAX_NOT_LOADED', file=sys.stderr)\n")


def time_command(argv: list[str], env: dict, repeats: int) -> tuple[list[float], bool]:
    """Wall seconds of ``repeats`` fresh runs of the CLI with ``argv``, and whether JAX was imported."""
    seconds, loaded = [], set()
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if proc.returncode != 0 or "JAX_" not in proc.stderr:
            raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
        loaded.add("JAX_LOADED" in proc.stderr)
    if len(loaded) != 1:
        raise SystemExit(f"{' '.join(argv)}: JAX loaded in some repeats only")
    return seconds, loaded.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="e.g. 'before' or 'after': which code is timed")
    parser.add_argument("--code", default=None, help="a kernel-distill checkout to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    code = pathlib.Path(args.code).resolve() if args.code else pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(code / "src"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=code).stdout.strip()
    from kernel_distill.results import append_record, make_record

    for name, argv in COMMANDS.items():
        seconds, jax_loaded = time_command(argv, env, args.repeats)
        ordered = sorted(seconds)
        median = ordered[len(ordered) // 2]
        load = os.getloadavg()[0]
        print(f"kernel-distill {name} [{args.label}, {commit[:7]}]: median {median:.2f} s, fastest {ordered[0]:.2f} s "
              f"over {args.repeats}; JAX {'loaded' if jax_loaded else 'not loaded'}; load average {load:.1f}")
        record = make_record("benchmark/cli_startup", args.label, dict(name="none", checksums={}),
                             dict(median_seconds=median, fastest_seconds=ordered[0], seconds=seconds,
                                  load_average=load),
                             dict(command=name, label=args.label, repeats=args.repeats, jax_loaded=jax_loaded,
                                  code=args.code or "this checkout", code_commit=commit),
                             wall_seconds=sum(seconds))
        append_record(args.results, record)


if __name__ == "__main__":
    main()
