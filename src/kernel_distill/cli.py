"""The ``kernel-distill`` command line.

It parses arguments, builds each command's request and hands it to the command's workflow
(:mod:`kernel_distill.workflows`), which checks it, owns the output folder, computes and writes the record.
The subcommand parsers live beside their workflows; importing this module loads no JAX, so ``--help`` is
fast.

Every user-facing failure (bad argument, missing or malformed file, impossible request) prints one line,
``kernel-distill: error: ...``, and exits with code 2; Ctrl-C exits with 130, SIGTERM with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import threading
from types import FrameType, ModuleType
from typing import Iterator

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import COMMAND_MODULES
from kernel_distill.workflows.arguments import (  # noqa: F401 (RF_NORM_CHOICES: tests compare it with the library's)
    EXIT_USAGE, RF_NORM_CHOICES, OneLineErrorParser)

# Subcommand name -> its workflow module (kernel_distill.workflows.<module>).
_WORKFLOWS = {module.replace("_", "-"): module for module in COMMAND_MODULES}


def _workflow(command: str) -> ModuleType:
    return importlib.import_module(f"kernel_distill.workflows.{_WORKFLOWS[command]}")


def build_parser() -> argparse.ArgumentParser:
    from kernel_distill import __version__

    parser = OneLineErrorParser(
        prog="kernel-distill",
        description="Dataset distillation with infinite-width neural kernels (KIP, Label Solve).")
    parser.add_argument("--version", action="version", version=f"kernel-distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for command in _WORKFLOWS:
        _workflow(command).add_parser(sub)
    return parser


# 128 + the signal's number, the shell's convention
EXIT_SIGNAL: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, a scheduler's preemption, a container stop) end a command the
    same way: the first one raises ``KeyboardInterrupt``, so a KIP run checkpoints and writes its outputs;
    later ones are ignored while that cleanup runs (a second Ctrl-C would otherwise land in the middle of a
    file write or a destructor, and print Python's "Exception ignored in ..."). The exit code says which
    signal came first: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return 130 if self.received is None else EXIT_SIGNAL.get(self.received, 130)

    @contextlib.contextmanager
    def installed(self, keep: bool = False) -> Iterator[None]:
        """Handle both signals in the ``with`` block; ``keep``: leave later signals ignored afterwards (the
        console script, whose interpreter shuts down next and must not be interrupted while it does)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle) for s in EXIT_SIGNAL}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if keep and self.received is not None else handler)


def main(argv: list[str] | None = None, *, _keep_signal_handlers: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["kernel-distill", *(sys.argv[1:] if argv is None else argv)]  # for results.json
    signals = _Signals()
    try:
        with signals.installed(keep=_keep_signal_handlers):
            return _run_command(args)
    except KeyboardInterrupt:
        print("kernel-distill: interrupted", file=sys.stderr)
        return signals.exit_code()


def _run_command(args: argparse.Namespace) -> int:
    from kernel_distill.results import capture_code_version

    capture_code_version()
    try:
        workflow = _workflow(args.command)
        request = workflow.request_from_args(args)
        if getattr(args, "json", False) and args.command != "zoo":  # zoo's --json is its own output format
            workflow.run(request, on_record=lambda record: print(json.dumps(record)))
        else:
            workflow.run(request)
        return 0
    except KernelDistillError as e:
        print(f"kernel-distill: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # no space, no permission, not a folder: the path and the reason, not a traceback
        from kernel_distill.runs import describe_os_error

        print(f"kernel-distill: error: {describe_os_error(e, 'file error on')}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a JAX out-of-memory error is the user's to fix, not a bug to dump on them
        if "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError):
            print("kernel-distill: error: out of memory; lower --memory-budget-mb, the batch or the "
                  "support size", file=sys.stderr)
            return EXIT_USAGE
        raise


def entry_point() -> None:  # console script
    sys.exit(main(_keep_signal_handlers=True))


if __name__ == "__main__":
    entry_point()
