"""The workflow layer: a request built in Python (no argparse) runs a command as the CLI does, and the
command line's parser loads no JAX."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kernel_distill.cli import main
from kernel_distill.errors import KernelDistillError
from kernel_distill.results import read_results
from kernel_distill.workflows import baseline, evaluate, report, transfer, zoo
from kernel_distill.workflows.common import KernelChoice

COMMANDS = ("datasets", "evaluate", "baseline", "kip", "label-solve", "transfer", "report", "zoo", "export", "demo")


def _fresh_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_loads_no_jax():
    """`kernel-distill --help` and `kernel-distill CMD --help` build every parser without importing JAX (it
    takes seconds to load); the subcommand parsers live beside their workflows, which import lazily."""
    printed = _fresh_python(
        "import contextlib, io, sys\n"
        "from kernel_distill.cli import main\n"
        f"for argv in [['--help'], *[[c, '--help'] for c in {COMMANDS!r}], ['zoo', 'list', '--help']]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'matplotlib')))\n")
    assert printed.strip() == "[]"


def test_the_zoo_and_data_import_no_kernel():
    """The zoo is an index (measuring a set is a workflow) and data owns its checksums: neither reaches the
    kernels, KRR or the experiments."""
    printed = _fresh_python(
        "import sys\n"
        "import kernel_distill.zoo, kernel_distill.data\n"
        "heavy = ('kernel_distill.kernels', 'kernel_distill.krr', 'kernel_distill.experiments', 'jax')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    assert printed.strip() == "[]"


def test_checksums_keep_their_old_homes():
    from kernel_distill import checksums, data, export, results
    from kernel_distill import zoo as zoo_index

    assert results.split_checksum is data.split_checksum is checksums.split_checksum
    assert export.file_sha256 is zoo_index.file_sha256 is checksums.file_sha256
    # The zoo is an index: measuring and copying sets out are workflows, and it does not forward to them.
    assert not hasattr(zoo_index, "evaluate_file") and not hasattr(zoo_index, "export")
    assert callable(zoo.evaluate_file) and callable(zoo.export_set)


def _comparable(record: dict) -> dict:
    """A record without what differs between two runs of the same request (time, date, command line)."""
    return {k: v for k, v in record.items() if k != "provenance"}


def test_a_request_built_in_python_runs_as_the_cli_does(tmp_path, capsys):
    argv = ["baseline", "--dataset", "digits", "--per-class", "3", "--seeds", "2", "--test-limit", "200",
            "--no-progress", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    cli_lines = capsys.readouterr().out.splitlines()
    lines = []
    request = baseline.BaselineRequest(dataset="digits", per_class=3, seeds=2, test_limit=200,
                                       out=str(tmp_path / "python"), progress=False,
                                       command_line=("kernel-distill", *argv))
    record = baseline.run(request, log=lines.append)
    assert capsys.readouterr().out == ""  # every message went to log
    assert record == read_results(tmp_path / "python")
    assert _comparable(record) == _comparable(read_results(tmp_path / "cli"))
    assert sorted(p.name for p in (tmp_path / "python").iterdir() if not p.name.startswith(".")) == \
        ["natural.npz", "results.json"]
    assert [line.replace(str(tmp_path / "python"), str(tmp_path / "cli")) for line in lines] == cli_lines
    # the seed-0 subset, scored in Python without an output folder: nothing written, the same accuracy
    scored = evaluate.run(evaluate.EvaluateRequest(str(tmp_path / "python" / "natural.npz"), test_limit=200,
                                                   progress=False), log=lambda _: None)
    assert scored["metrics"]["test_accuracy"] == pytest.approx(record["metrics"]["test_accuracies"][0])
    # and a report of both folders, as `kernel-distill report` writes it
    index = report.run(report.ReportRequest(runs=(str(tmp_path / "cli"), str(tmp_path / "python")),
                                            out=str(tmp_path / "report")), log=lambda _: None)
    assert index == tmp_path / "report" / "index.html" and index.is_file()


def test_json_prints_the_record_once_it_is_written(tmp_path, capsys):
    """--json prints the record right after results.json is written: label-solve names its outputs after it."""
    out = tmp_path / "ls"
    assert main(["label-solve", "--dataset", "digits", "--support-size", "10", "--train-limit", "100",
                 "--test-limit", "50", "--no-progress", "--json", "--out", str(out)]) == 0
    *_, printed, outputs = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed) == read_results(out)
    assert outputs == f"outputs in {out}: distilled.npz, label_covariance.png, results.json"


def test_a_bad_request_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(KernelDistillError, match="--per-class must be a positive integer"):
        baseline.run(baseline.BaselineRequest(dataset="digits", per_class=0, out=str(out)))
    with pytest.raises(KernelDistillError, match="--rf-models"):
        baseline.run(baseline.BaselineRequest(dataset="digits", kernel=KernelChoice(kernel="fc", rf_models=2),
                                              out=str(out), progress=False), log=lambda _: None)
    with pytest.raises(KernelDistillError, match="give a distilled-set FILE or --natural-per-class"):
        transfer.run(transfer.TransferRequest(out=str(out)))
    with pytest.raises(KernelDistillError, match="--tune cannot tune"):
        transfer.run(transfer.TransferRequest(natural_per_class=2, dataset="digits", tune=("width=1,2",),
                                              out=str(out)))
    assert not out.exists()


def test_kip_and_export_requests_run_as_the_cli_does(tmp_path, capsys):
    from kernel_distill.export import read_export
    from kernel_distill.io import load_distilled
    from kernel_distill.workflows import export, kip

    argv = ["kip", "--dataset", "digits", "--per-class", "1", "--steps", "4", "--eval-every", "2",
            "--checkpoint-every", "2", "--target-batch", "100", "--test-limit", "100", "--no-progress",
            "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    capsys.readouterr()
    request = kip.KipRequest(dataset="digits", per_class=1, steps=4, eval_every=2, checkpoint_every=2,
                             target_batch=100, test_limit=100, out=str(tmp_path / "python"), progress=False)
    record = kip.run(request, log=lambda _: None)
    cli = read_results(tmp_path / "cli")
    assert record["config"] == cli["config"] and record["metrics"]["steps"] == cli["metrics"]["steps"] == 4
    # a resumed run takes only the new total of steps; anything else is refused before data is loaded
    with pytest.raises(KernelDistillError, match="--resume continues the saved run unchanged"):
        kip.run(kip.KipRequest(resume=str(tmp_path / "python"), steps=6, per_class=2, progress=False))
    summary = export.run(export.ExportRequest(str(tmp_path / "python"), str(tmp_path / "set.safetensors"),
                                              "safetensors"), log=lambda _: None)
    assert summary["exact"]
    exported = read_export(tmp_path / "set.safetensors")
    assert (exported.images == load_distilled(tmp_path / "python" / "distilled_best.npz").images).all()


def test_every_command_is_a_workflow_with_a_frozen_request():
    import dataclasses
    import importlib

    from kernel_distill.cli import build_parser
    from kernel_distill.workflows import COMMAND_MODULES

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {m.replace("_", "-") for m in COMMAND_MODULES} == set(COMMANDS)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"kernel_distill.workflows.{name}")
        assert callable(module.run) and callable(module.add_parser) and callable(module.request_from_args)
        requests = [v for k, v in vars(module).items() if k.endswith("Request") and dataclasses.is_dataclass(v)]
        assert requests and all(r.__dataclass_params__.frozen for r in requests), name


def test_the_zoo_module_imports_nothing_that_measures():
    """Not even inside a function: measuring is the zoo workflow's (its old names are forwarded there)."""
    import ast
    import inspect

    from kernel_distill import zoo as zoo_index

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(zoo_index))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    measuring = ("kernel_distill.kernels", "kernel_distill.krr", "kernel_distill.experiments", "jax")
    assert not [m for m in imported if m.startswith(measuring)], imported
