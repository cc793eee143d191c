"""Work-arounds for bugs of the XLA CPU backend, applied when the package is imported, before JAX starts
a backend (standard library only: importing the package still loads no JAX).

jaxlib 0.10's CPU backend runs some operations through YNNPACK fusions; on an AMD EPYC machine one of them
(a transpose, ``slinky::fuse_contiguous_dims`` under ``YnnFusionThunk``) segfaults the process while it
runs the jitted gradient of the ConvNet kernel (``tests/test_kernels.py::
test_gradients_are_finite_on_the_diagonal``, every run, 2026-12-02; the same test passed on the machine of
earlier sessions). An empty ``--xla_cpu_experimental_ynn_fusion_type`` turns the YNN fusions off, and XLA's
own kernels run instead.

What it costs, measured 2026-12-07 on that machine with two other jobs beside it (so roughly): a float32
evaluation-ConvNet training step was faster without the fusions (0.83-0.88 s against 1.16-1.34 s), the
exact ConvNet NTK the same in float32 and float64 (0.3-0.6 s for 8 x 16 pairs either way), but float64
convolutions in finite networks 5x slower (12.6 s against 2.5 s for a width-512 ConvNet's Jacobian); keeping
only ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`` also avoided the crash and kept that float64 speed, at a
slower float32 step (1.11 s). Float32 is what users train in, so all fusions stay off.

On an Intel Xeon machine (2026-12-08) it is the other way round: with the fusions off, the float64 jitted
gradient of the ConvNet kernel segfaults (``tests/test_distributed.py::
test_ray_kip_loss_and_gradients_equal_local_and_jax_grad[convnet]``, every run; also with only
``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`` kept, and with XNNPACK, oneDNN, the thunk runtime or fusion
emitters switched off), and with jaxlib's defaults it runs. So the flag is added on AMD processors only, the
one kind on which the fusions were seen to crash.
"""

from __future__ import annotations

import os

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
AFFECTED_JAXLIB = ("0.10.",)  # another version may not know the flag, and XLA aborts on an unknown flag


def avoid_known_xla_cpu_crashes() -> bool:
    """Add ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS`` for an affected jaxlib, unless the
    user's ``XLA_FLAGS`` already sets that flag or ``KERNEL_DISTILL_KEEP_XLA_FLAGS`` is set. Returns whether
    the flag was added. Takes effect only if JAX has not started its CPU backend yet (it reads ``XLA_FLAGS``
    then); subprocesses inherit it."""
    from importlib import metadata

    if os.environ.get("KERNEL_DISTILL_KEEP_XLA_FLAGS"):
        return False
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if not version.startswith(AFFECTED_JAXLIB) or not affected_processor() or YNN_FLAG_NAME in flags:
        return False
    # first: XLA stops reading flags at a word that is not one, so a flag appended after it is lost
    os.environ["XLA_FLAGS"] = f"--{YNN_FLAG_NAME}= {flags}".strip()
    return True


def affected_processor() -> bool:
    """Whether this machine's processor is of the kind the crash was seen on (AMD, from ``/proc/cpuinfo``;
    False where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False
