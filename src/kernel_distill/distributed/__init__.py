"""Distributed kernel computation: the backend interface, the local backend and (optional) Ray.

A backend computes kernel blocks and their VJPs (:class:`kernel_distill.objective.BlockExecutor`), Label-Solve
partial sums and predictions, over some workers. ``open_backend(BackendOptions("ray", workers=2))`` starts Ray
workers; every function that computes kernels for a whole run (:func:`kernel_distill.kip.run_kip`,
:func:`kernel_distill.krr.evaluate`, :func:`kernel_distill.label_solve.solve_labels`) takes ``backend=``.
See docs/DISTRIBUTED.md.
"""

from kernel_distill.distributed.backend import BACKENDS, Backend, BackendOptions, LocalBackend, compute_dtype
from kernel_distill.distributed.opening import open_backend

__all__ = ["BACKENDS", "Backend", "BackendOptions", "LocalBackend", "compute_dtype", "open_backend"]
