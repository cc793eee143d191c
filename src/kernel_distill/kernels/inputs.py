"""The inputs of a kernel call: checked against the architecture, and brought to one floating dtype.

Shared by the exact kernels (:class:`kernel_distill.kernels.api.KernelFn`) and the random-feature kernels
(:class:`kernel_distill.kernels.random_features.RandomFeatureKernelFn`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels.spec import KernelSpec

if TYPE_CHECKING:
    from jax.typing import ArrayLike


def check_inputs(spec: KernelSpec, x1: jax.Array, x2: jax.Array) -> None:
    """Raise a one-line :class:`KernelDistillError` unless ``x1`` ``(n1, ...)`` and ``x2`` ``(n2, ...)`` suit
    ``spec``: a batch axis, NHWC images for networks that take images, large enough for their pools, equal
    shapes past the batch axis, and at least one row each."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x.ndim < 2:
            raise KernelDistillError(f"{name} must have a leading batch axis, got shape {x.shape}")
        if spec.is_conv and x.ndim != 4:
            raise KernelDistillError(
                f"the {spec.architecture} kernel needs NHWC images (n, H, W, C); {name} has shape {x.shape}")
    if x1.shape[1:] != x2.shape[1:]:
        raise KernelDistillError(f"x1 and x2 differ in shape past the batch axis: {x1.shape} vs {x2.shape}")
    if spec.is_conv:
        smallest = spec.min_spatial_size()
        if min(x1.shape[1:3]) < smallest:
            raise KernelDistillError(
                f"{spec.architecture} with depth {spec.depth} needs images of at least "
                f"{smallest}x{smallest} pixels (one 2x2 pool per block); got {x1.shape[1]}x{x1.shape[2]}")
    if x1.shape[0] == 0 or x2.shape[0] == 0:
        raise KernelDistillError("empty input: x1 and x2 need at least one row each")


def float_pair(x1: ArrayLike, x2: ArrayLike | None,
               check: Callable[[jax.Array, jax.Array], None]) -> tuple[jax.Array, jax.Array | None]:
    """The inputs of a kernel call as arrays of one floating dtype (their common one; float32 for integers),
    after ``check(x1, x2)``. Returns ``(x1, x2)``, with ``x2`` ``None`` when it was ``None`` or ``x1`` itself
    (so the self statistics or features are computed once)."""
    same = x2 is None or x2 is x1
    x1 = jnp.asarray(x1)
    x2 = x1 if same else jnp.asarray(x2)
    check(x1, x2)
    dtype = jnp.result_type(x1.dtype, x2.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return x1.astype(dtype), None if same else x2.astype(dtype)
