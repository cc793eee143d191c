"""The one way the benchmark scripts run a kernel-distill command: a subprocess, its JSON result record back."""

from __future__ import annotations

import json
import subprocess
import sys


class CommandFailed(RuntimeError):
    """A kernel-distill command exited non-zero (the message ends with its error output)."""


def cli(*args) -> dict:
    """Run ``kernel-distill ARGS --no-progress --json`` and return its result record (CommandFailed if not 0)."""
    cmd = [sys.executable, "-m", "kernel_distill.cli", *args, "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
