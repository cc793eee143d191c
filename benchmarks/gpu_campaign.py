"""The GPU campaign: the exact-kernel CIFAR-10 work a lent GPU does in one command, under 9 minutes.

    KERNEL_DISTILL_DATA=../shared/data python benchmarks/gpu_campaign.py --out $OUT/campaign   # on the GPU
    .venv/bin/python benchmarks/gpu_campaign.py --toy --out /tmp/campaign                      # CPU, toy size

Stages, each with its share of the wall-clock budget (``--budget-seconds``, default 510 s = 8.5 minutes):

1. **Label Solve with the exact convnet3 NNGP**: 500 natural CIFAR-10 images (50 per class, seed 0, outside
   the 1,000 validation images kip holds out) over all 49,000 other training images, ZCA as the KIP
   CIFAR-10 runs; KRR on the whole test set with natural and solved labels. Checkpointed every block
   (``label-solve --resume`` continues it on the next lent GPU).
2. **KIP with the exact convnet3 NNGP**, warm started from the best CPU set (``--init-from``, default the
   zoo's CIFAR-10 10/class set), labels learned, validation-selected, for the rest of the budget.

A stage that reaches its deadline is interrupted as Ctrl-C would: Label Solve keeps its last checkpoint,
KIP checkpoints and writes its sets. After every stage (finished, stopped or failed) a record is appended
to ``OUT/campaign.jsonl`` at once, so what was done comes back however the session ends; the sets are in the
stage folders (``OUT/label-solve``, ``OUT/kip``). ``--toy`` runs the same code on scikit-learn digits
(20 support images, the FC kernel: seconds per stage): the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import signal
import sys
import time
import traceback
from typing import Callable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]

REAL = dict(dataset="cifar10", support_size=500, val_size=1000, block_size=1000, kernel="convnet3", zca=True,
            init_from="zoo:cifar10-lossy-kip-convnet3rf-10ipc", per_class=10, target_batch=1000, lr=0.01,
            eval_every=20, test_limit=None, label_solve_share=0.6)
TOY = dict(dataset="digits", support_size=20, val_size=100, block_size=300, kernel="fc", depth=1, zca=False,
           init_from="label-solve", per_class=2, target_batch=100, lr=0.01, eval_every=2, test_limit=None,
           label_solve_share=0.5)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` in the main thread after ``seconds`` (what Ctrl-C does: the workflows
    checkpoint and write their outputs before it propagates)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def append_record(path: pathlib.Path, record: dict) -> None:
    """One JSON line, flushed and synced: a campaign stopped the next second still has it."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def machine() -> dict:
    import jax

    devices = jax.devices()
    return dict(platform=devices[0].platform, device=str(devices[0].device_kind), devices=len(devices),
                host=f"{platform.machine()}, {os.cpu_count()} CPUs", jax=jax.__version__)


def run_stage(name: str, seconds: float, work: Callable[[], dict], records: pathlib.Path, extra: dict) -> dict:
    """Run ``work`` under a deadline; record how it ended (``finished``, ``stopped at the deadline``,
    ``failed``) with its result or what it left, then return the record."""
    began = time.perf_counter()
    record: dict = dict(stage=name, budget_seconds=round(seconds, 1), **extra)
    try:
        with deadline(seconds):
            result = work()
        record.update(status="finished", result=result)
    except KeyboardInterrupt:
        record.update(status="stopped at the deadline")
    except Exception as e:  # a failed stage must not cost the next one its minutes, nor the record
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
    record.update(seconds=round(time.perf_counter() - began, 1),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    append_record(records, record)
    print(f"[campaign] {name}: {record['status']} after {record['seconds']:.0f} s", flush=True)
    return record


def label_solve_stage(plan: dict, out: pathlib.Path, data_dir: str | None, progress: bool) -> Callable[[], dict]:
    def work() -> dict:
        from kernel_distill.workflows.common import KernelChoice, Preprocessing
        from kernel_distill.workflows.label_solve import LabelSolveRequest, run

        folder = out / "label-solve"
        resume = (folder / "label_solve_config.json").is_file()  # a campaign run again continues the pass
        request = LabelSolveRequest(
            dataset=None if resume else plan["dataset"], support_size=None if resume else plan["support_size"],
            val_size=None if resume else plan["val_size"], block_size=None if resume else plan["block_size"],
            test_limit=None if resume else plan["test_limit"], out=None if resume else str(folder),
            resume=str(folder) if resume else None, data_dir=data_dir, progress=progress,
            kernel=KernelChoice() if resume else KernelChoice(kernel=plan["kernel"], depth=plan.get("depth"), get="nngp"),
            preprocessing=Preprocessing(zca=plan["zca"] and not resume))
        record = run(request, log=lambda line: print(line, flush=True))
        return dict(folder=str(folder), metrics=record["metrics"], resumed=resume)
    return work


def label_solve_progress(out: pathlib.Path) -> dict:
    """What a stopped Label Solve left: the rows its last checkpoint covers."""
    import numpy as np

    path = out / "label-solve" / "label_solve_checkpoint.npz"
    if not path.is_file():
        return dict(rows_done=0)
    with np.load(path) as f:
        return dict(rows_done=int(f["count"]), rows_total=int(f["num_train"]))


def kip_stage(plan: dict, out: pathlib.Path, data_dir: str | None, progress: bool) -> Callable[[], dict]:
    def work() -> dict:
        from kernel_distill.workflows.common import KernelChoice
        from kernel_distill.workflows.kip import KipRequest, run

        init = plan["init_from"]
        if init == "label-solve":
            init = str(out / "label-solve" / "distilled.npz")
        request = KipRequest(dataset=plan["dataset"], per_class=plan["per_class"], learn_labels=True, init_from=init,
                             target_batch=plan["target_batch"], lr=plan["lr"], steps=100_000,
                             eval_every=plan["eval_every"], checkpoint_every=plan["eval_every"],
                             val_size=plan["val_size"], test_limit=plan["test_limit"], zca=plan["zca"] or None,
                             kernel=KernelChoice(kernel=plan["kernel"], depth=plan.get("depth"), get="nngp"),
                             out=str(out / "kip"),
                             data_dir=data_dir, progress=progress)
        record = run(request, log=lambda line: print(line, flush=True))
        return dict(folder=str(out / "kip"), metrics=record["metrics"])
    return work


def kip_progress(out: pathlib.Path) -> dict:
    """What a stopped KIP run wrote: its results.json (written on the interrupt) or nothing."""
    path = out / "kip" / "results.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return dict(metrics=record.get("metrics"), selection=record.get("selection"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="campaign folder (campaign.jsonl and one folder per stage)")
    parser.add_argument("--budget-seconds", type=float, default=510.0, help="wall clock for all stages (510)")
    parser.add_argument("--toy", action="store_true", help="digits at toy size (the CPU test of this script)")
    parser.add_argument("--init-from", default=None, help="KIP's warm start (default: the zoo's CIFAR-10 10/class set)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    plan = dict(TOY if args.toy else REAL)
    if args.init_from:
        plan["init_from"] = args.init_from
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "campaign.jsonl"
    progress = not args.no_progress
    header = dict(stage="start", plan=plan, budget_seconds=args.budget_seconds, machine=machine(),
                  command=" ".join([sys.executable, *sys.argv]) if argv is None else " ".join(argv))
    append_record(records, header)

    share = args.budget_seconds * plan["label_solve_share"]
    solved = run_stage("label-solve", share, label_solve_stage(plan, out, args.data_dir, progress), records,
                       dict(kernel=plan["kernel"], support_size=plan["support_size"]))
    if solved["status"] != "finished":
        append_record(records, dict(stage="label-solve progress", **label_solve_progress(out)))
    if plan["init_from"] == "label-solve" and solved["status"] != "finished":
        append_record(records, dict(stage="kip", status="skipped: its warm start (the Label Solve set) is unfinished"))
    else:
        left = args.budget_seconds - (time.perf_counter() - began)
        kip = run_stage("kip", left, kip_stage(plan, out, args.data_dir, progress), records,
                        dict(kernel=plan["kernel"], init_from=plan["init_from"]))
        if kip["status"] != "finished":
            append_record(records, dict(stage="kip progress", **kip_progress(out)))
    append_record(records, dict(stage="end", seconds=round(time.perf_counter() - began, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
