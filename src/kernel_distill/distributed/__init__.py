"""Distributed kernel computation: the backend interface, the local backend and (optional) Ray.

``open_backend(BackendOptions("ray", workers=2))`` starts Ray workers; every function that computes kernels
for a whole run (:func:`kernel_distill.kip.run_kip`, :func:`kernel_distill.krr.evaluate`,
:func:`kernel_distill.label_solve.solve_labels`) takes ``backend=``. See docs/DISTRIBUTED.md.
"""

from kernel_distill.distributed.backend import (
    BACKENDS, Backend, BackendOptions, LocalBackend, compute_dtype, krr_loss_vjp, open_backend)

__all__ = ["BACKENDS", "Backend", "BackendOptions", "LocalBackend", "compute_dtype", "krr_loss_vjp",
           "open_backend"]
