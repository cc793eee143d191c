"""Infinite-width NNGP and NTK kernels of ReLU networks, computed in closed form with JAX.

* :mod:`~kernel_distill.kernels.layers`: the layer classes, each carrying its rules (shapes, band plan, exact
  NNGP/NTK step, finite init and forward pass), and :func:`serial`.
* :mod:`~kernel_distill.kernels.spec`: architectures as layer tuples, the registry, :class:`KernelSpec`.
* :mod:`~kernel_distill.kernels.bands`: linear operators on banded conv covariances.
* :mod:`~kernel_distill.kernels.exact`: the generic layer walk for one block.
* :mod:`~kernel_distill.kernels.networks`: :class:`LayerNet`, the finite flax network of a layer tuple.
* :mod:`~kernel_distill.kernels.api`: whole matrices under a memory budget, and the block + VJP API.
* :mod:`~kernel_distill.kernels.random_features`: the NNGP approximated by random finite networks (RFAD).

See docs/KERNELS.md for the recursions, the banded representation and the numerical care at the diagonal.
"""

from kernel_distill.kernels.api import (
    CPU_TILE_BYTES, DEFAULT_MEMORY_BUDGET_BYTES, KernelFn, bytes_per_pair, default_memory_budget_mb,
    kernel_block_vjp, kernel_matrix,
    kernel_matrix_from_stats, kernel_matrix_vjp, make_kernel_fn, self_stats_vjp, tiled_self_stats,
    tiled_self_stats_vjp)
from kernel_distill.kernels.exact import (
    kernel_block, kernel_block_from_partner, layer_plan, partner_arrays, self_stats)
from kernel_distill.kernels.layers import InstanceNorm, Layer, serial
from kernel_distill.kernels.spec import (
    ARCHITECTURE_REGISTRY, ARCHITECTURES, AvgPool, Conv, Dense, Flatten, KernelSpec, RandomFeatures, Relu,
    register_architecture)
from kernel_distill.kernels.random_features import RandomFeatureKernelFn

__all__ = [
    "ARCHITECTURES", "ARCHITECTURE_REGISTRY", "AvgPool", "CPU_TILE_BYTES", "Conv", "DEFAULT_MEMORY_BUDGET_BYTES",
    "Dense", "Flatten", "InstanceNorm", "KernelFn", "Layer", "KernelSpec", "RandomFeatureKernelFn", "RandomFeatures", "Relu", "bytes_per_pair", "default_memory_budget_mb", "kernel_block", "kernel_block_vjp",
    "kernel_block_from_partner", "kernel_matrix", "kernel_matrix_from_stats", "kernel_matrix_vjp", "layer_plan",
    "make_kernel_fn", "partner_arrays", "register_architecture", "self_stats", "self_stats_vjp", "serial",
    "tiled_self_stats", "tiled_self_stats_vjp",
]
