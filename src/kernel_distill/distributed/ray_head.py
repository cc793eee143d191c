"""A Ray head of its own for one command, run as a script in a fresh interpreter (never a fork of the driver).

``python -P ray_head.py NUM_CPUS`` starts Ray on loopback (127.0.0.1, no dashboard, no token file), writes
one JSON line ``{"address": "127.0.0.1:PORT", "pid": ...}`` to stdout, and keeps Ray running until its
standard input closes (the driver closed it, or the driver died) or it gets SIGTERM; then it shuts Ray down
and exits. :class:`kernel_distill.distributed.cluster.LocalRayHead` starts and stops it.

Why a separate process: starting Ray forks its system processes (GCS server, raylet, log monitor) from the
process that calls ``ray.init``, through ``subprocess.Popen(preexec_fn=...)``, which runs Python code in the
forked child. In the driver, where JAX already runs its threads, that is unsafe (and JAX warns about it);
here no JAX is imported, so the forks are the ordinary kind. The driver only spawns this interpreter and
connects to the address it prints. This file imports neither JAX nor kernel_distill (``-P``: the script's
folder is not put on ``sys.path``), so it starts in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

# cluster.LOOPBACK_ENVIRONMENT (this script cannot import the package: that would import JAX)
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def main(argv: list[str]) -> int:
    num_cpus = int(argv[0])

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    # a Ctrl-C is the driver's (this runs in a session of its own anyway): it stops us by closing our stdin
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name, value in LOOPBACK_ENVIRONMENT.items():  # read by Ray at import, inherited by its processes
        os.environ[name] = value
    import ray

    try:
        # "local": a new instance even if RAY_ADDRESS names another (the driver also leaves it out of our env)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level=logging.ERROR, log_to_driver=False)
        print(json.dumps(dict(address=ray.get_runtime_context().gcs_address, pid=os.getpid())), flush=True)
        sys.stdin.read()  # until the driver closes the pipe or dies
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
