"""Opening the backend a run asks for: the local one, or Ray's (its driver in a process of its own).

Kept apart from :mod:`kernel_distill.distributed.backend`, which the Ray backends build on, so that the
interface module imports none of its implementations.
"""

from __future__ import annotations

import sys
from typing import Callable

from kernel_distill.distributed.backend import Backend, BackendOptions, LocalBackend


def open_backend(options: BackendOptions | None = None, log: Callable[[str], None] = print) -> Backend:
    """The backend ``options`` ask for (a started Ray backend for ``"ray"``); close it when done.

    Ray's driver runs in a process of its own (:class:`~kernel_distill.distributed.driver.RayDriverBackend`),
    so that a Ray system process that dies ends the command with one line, not with Ray ending this process;
    if the caller has initialised Ray in this process, that Ray is used from here
    (:class:`~kernel_distill.distributed.ray_backend.RayBackend`)."""
    options = options or BackendOptions()
    if options.backend == "local":
        return LocalBackend()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from kernel_distill.distributed.ray_backend import RayBackend

        return RayBackend.start(workers=options.workers, address=options.address, retries=options.retries, log=log)
    from kernel_distill.distributed.driver import RayDriverBackend

    return RayDriverBackend.start(workers=options.workers, address=options.address, retries=options.retries, log=log)
