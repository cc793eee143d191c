"""One-off: turn the hand-written tables of docs/BENCHMARKS.md (commit c979632) into result records.

Those numbers were made by the benchmark scripts before they wrote result records, and their output files
were not kept. Rather than merge them by hand into the new generated tables, this script reads each table
as it stood and writes one record per cell, marked ``"source": "transcribed"`` with the document and commit
it came from (provenance fields that were not recorded are null). ``benchmarks/tables.py`` marks such rows;
a rerun of the benchmark command appends real records, which replace them (the newest record per cell wins).

    git show c979632:docs/BENCHMARKS.md > /tmp/benchmarks-c979632.md
    python tools/transcribe_benchmarks.py /tmp/benchmarks-c979632.md
"""

from __future__ import annotations

import pathlib
import re
import sys

from kernel_distill.results import PROVENANCE_KEYS, SCHEMA, SCHEMA_VERSION, validate_record

COMMIT = "c979632"
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DATASETS = {"MNIST": "mnist", "Fashion-MNIST": "fashion_mnist", "CIFAR-10 (lossy)": "cifar10"}
CPU = dict(backend="cpu", device="cpu (2-core Intel Xeon, the development machine)", jax_version="0.10.2")
H100 = dict(backend="gpu", device="NVIDIA H100 80GB HBM3", jax_version="0.11.2")


def tables(text: str) -> dict[int, list[list[str]]]:
    """Markdown tables by the line number of their header row: rows of stripped cells, header excluded."""
    found, lines = {}, text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            start, rows = i + 1, []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            found[start] = (lines[start - 1], rows)
        i += 1
    return found


def num(text: str) -> float:
    return float(re.sub(r"[*,x]", "", text).split()[0])


def frac(percent: float | None) -> float | None:
    """A percentage as printed -> a fraction, without float noise (97.07 -> 0.9707)."""
    return None if percent is None else round(percent / 100, 6)


def mean_std(text: str) -> tuple[float, float | None]:
    parts = re.sub(r"\*", "", text).split("+-")
    return float(parts[0]), (float(parts[1]) if len(parts) > 1 else None)


def record(command, method, dataset, metrics, config, machine, date="2026-11-25", command_line=None,
           selection=None, note=None):
    provenance = {key: None for key in PROVENANCE_KEYS}
    provenance.update(machine, date=date, command_line=command_line, dtype=config.get("dtype", "float32"),
                      source="transcribed", transcribed_from=f"docs/BENCHMARKS.md at commit {COMMIT}")
    if note:
        provenance["note"] = note
    return validate_record(dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, command=command, method=method,
                                dataset=dict(name=dataset, checksums={}), selection=selection or dict(split="none"),
                                metrics={k: v for k, v in metrics.items() if v is not None}, config=config, curves={},
                                artifacts={}, provenance=provenance))


def main(path: str):
    import json

    text = pathlib.Path(path).read_text()
    by_order = list(tables(text).items())
    out: dict[str, list] = {"kernel_throughput": [], "kip_fc": [], "transfer": []}

    # Kernel throughput: the CPU table (ours and neural-tangents) and the H100 table (ours).
    cpu_cmd = ".venv/bin/python benchmarks/kernel_throughput.py --nt-python /tmp/ntvenv/bin/python"
    h100_cmd = ("KD_BENCH_CONV_SIZE=64,256 KD_BENCH_BUDGET_MB=2048 python3 benchmarks/kernel_throughput.py "
                "--impls ours")
    for _, (header, rows) in by_order:
        if "neural-tangents pairs/s" in header:
            for net, shape, dtype, ours, nt, _, ours_mb, nt_mb in rows:
                for impl, pps, mb in (("ours", ours, ours_mb), ("neural-tangents", nt, nt_mb)):
                    out["kernel_throughput"].append(record(
                        "benchmark/kernel_throughput", impl, "synthetic",
                        dict(pairs_per_second=num(pps), peak_extra_mb=num(mb), machine_gflops=293.0, machine_gbps=8.3),
                        dict(network=net.lower(), input=shape, dtype=dtype, impl=impl), CPU, command_line=cpu_cmd))
        elif "device peak MB" in header:
            for net, shape, dtype, pps, mb, gflops, gbps in rows:
                out["kernel_throughput"].append(record(
                    "benchmark/kernel_throughput", "ours", "synthetic",
                    dict(pairs_per_second=num(pps), peak_device_mb=num(mb), gflop_per_second=num(gflops),
                         gb_per_second=num(gbps), machine_gflops=72000.0, machine_gbps=1590.0),
                    dict(network=net.lower(), input=shape, dtype=dtype, impl="ours", memory_budget_mb=2048), H100,
                    command_line=h100_cmd,
                    note="measured before the patch-matmul first conv; not re-measured on the GPU after it"))

    # KIP with the FC NTK: MNIST / Fashion-MNIST on the H100, CIFAR-10 (lossy) on the CPU. These runs picked
    # their best step on the TEST set, as the KIP papers did, and say so in their selection.
    for _, (header, rows) in by_order:
        if "best acc % (step)" not in header:
            continue
        on_cpu = "wall s (CPU)" in header
        for row in rows:
            name, per_class, labels, steps, final, best = row[:6]
            wall = row[-1]
            best_acc, best_step = re.match(r"([\d.]+) \((\d+)\)", best).groups()
            dataset = DATASETS[name]
            eval_every = 500 if on_cpu else 1000
            config = dict(dataset=dataset, per_class=int(per_class), learn_labels=labels == "learned", steps=int(steps),
                          kernel=dict(architecture="fc", depth=1), learning_rate=0.01, reg=1e-6,
                          target_batch_size=5000, eval_every=eval_every, select_on="test", val_size=0)
            cmd = ("KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/kip_fc.py --datasets cifar10 "
                   "--per-class 1 10 --steps 2000 2000 --labels learned --eval-every 500" if on_cpu else
                   "KERNEL_DISTILL_DATA=../shared/data python3 benchmarks/kip_fc.py --datasets mnist fashion_mnist "
                   "--per-class 1 10 50 --steps 3000 6000 4000")
            out["kip_fc"].append(record(
                "benchmark/kip_fc", "kip", dataset,
                dict(test_accuracy=frac(num(best_acc)), test_accuracy_final=frac(num(final)), best_step=int(best_step),
                     steps=int(steps), support_size=int(per_class) * 10, num_test=10000),
                config, CPU if on_cpu else H100, command_line=cmd,
                selection=dict(split="test", val_size=0, step=int(best_step), accuracy=frac(num(best_acc)))))
            out["kip_fc"][-1]["provenance"]["wall_seconds"] = num(wall)

    # Transfer: evalnet (MSE; CE at 1/class), KIP ConvNet, FC net. One record per set kind.
    sets = ("kip-fc", "ls", "natural")
    transfer_cmd = "KERNEL_DISTILL_DATA=../shared/data .venv/bin/python benchmarks/transfer.py"
    for line, (header, rows) in by_order:
        if "KIP-FC set %" not in header:
            continue
        title = [ln for ln in text.splitlines()[:line] if ln.startswith("### ")][-1]
        for row in rows:
            cells = dict(zip([c.strip() for c in header.strip().strip("|").split("|")], row))
            name, per_class = cells["dataset"], int(cells["per class"])
            if "evalnet" in title:
                model, steps, loss = "evalnet", 300, "ce" if "LS set %" in header and "KRR" not in header else "mse"
                batch = 128 if per_class == 50 else 256
                lr = 0.05
            elif "convnet" in title:
                model, steps, loss, batch, lr = "convnet", 300, "mse", 10, float(cells["lr"])
            else:
                model, steps, batch, lr = "fc", 1000, 256, 0.05
                loss = cells["loss"].lower()
            krr = cells.get("KRR % of KIP-FC / LS set", "")
            krr_values = [float(v) for v in krr.split("/")] if krr else [None, None]
            for kind, column, krr_value in zip(sets, ("KIP-FC set %", "LS set %", "natural %"), [*krr_values, None]):
                mean, std = mean_std(cells[column])
                config = dict(model=model, set=kind, per_class=per_class, loss=loss, steps=steps, batch_size=batch,
                              learning_rate=lr, optimizer="sgd", weight_decay=5e-4, seeds=3)
                out["transfer"].append(record(
                    "benchmark/transfer", "transfer", DATASETS[name],
                    dict(test_accuracy=frac(mean), test_accuracy_std=frac(std),
                         train_seconds_per_seed=num(cells["train s / seed"]), support_size=per_class * 10,
                         num_test=10000, set_krr_test_accuracy=frac(krr_value)),
                    config, CPU, command_line=transfer_cmd))

    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, records in out.items():
        target = RESULTS / f"{name}.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{target}: {len(records)} transcribed records")


if __name__ == "__main__":
    main(sys.argv[1])
