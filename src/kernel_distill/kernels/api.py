"""The public kernel API: whole matrices (:class:`KernelFn`), and blocks with their VJPs for schedulers.

Block API (what a distributed backend hands out, one block at a time)::

    s1, s2 = self_stats(spec, x1), self_stats(spec, x2)           # per image, once
    k = kernel_block(spec, x1, s1, x2, s2, get="ntk")              # (b1, b2)
    dx1, ds1, dx2, ds2 = kernel_block_vjp(spec, x1, s1, x2, s2, ct) # ct: (b1, b2) cotangent of k
    dx1 = dx1 + self_stats_vjp(spec, x1, ds1)                       # after summing ds1 over all blocks

Gradients of a loss of a kernel matrix are the sum of these over blocks; :func:`matrix_vjp` does it for
a whole matrix in the local process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import tiling
from kernel_distill.kernels.exact import (
    kernel_block, kernel_block_from_partner, layer_plan, partner_arrays, self_stats, starts_flat)
from kernel_distill.kernels.inputs import check_inputs, float_pair  # noqa: F401  (float_pair: also from here)
from kernel_distill.kernels.random_features import RandomFeatureKernelFn
from kernel_distill.kernels.spec import KernelSpec

if TYPE_CHECKING:
    from jax.typing import ArrayLike

Get = Literal["ntk", "nngp"]
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
# On a CPU, small tiles win: the band arrays of a tile that fits the caches are read and written many
# times per layer. Accelerators want tiles as large as the budget.
CPU_TILE_BYTES = 16 * 2**20
# Accelerator tiles: the lent H100 ran the 28x28 banded ConvNet kernel at 20,642 pairs/s with 2 GiB tiles and
# 81,461 with 16 GiB (docs/BENCHMARKS.md): a GPU wants many pairs per launch.
ACCELERATOR_BUDGET_SHARE = 1 / 8
ACCELERATOR_BUDGET_CAP_MB = 16384.0


def default_memory_budget_mb(device: jax.Device | None = None) -> float:
    """The memory budget of one kernel tile when none is given, in MiB.

    512 on a CPU (whose tiles are capped at cache size anyway). On an accelerator, an eighth of its memory
    (``memory_stats()["bytes_limit"]``), between 512 and 16,384 MiB: a tile's forward and backward arrays
    (about three budgets) then stay well inside what JAX holds.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return DEFAULT_MEMORY_BUDGET_BYTES / 2**20
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # a backend without memory statistics
        limit = None
    if not limit:
        return DEFAULT_MEMORY_BUDGET_BYTES / 2**20
    share = limit * ACCELERATOR_BUDGET_SHARE / 2**20
    return float(min(ACCELERATOR_BUDGET_CAP_MB, max(DEFAULT_MEMORY_BUDGET_BYTES / 2**20, share)))


# Live arrays per image pair inside one block, forward or rematerialised backward (nngp, ntk, padded and
# shifted copies, ReLU temporaries). A generous round number keeps the budget an upper bound.
ARRAYS_PER_PAIR = 12


def pair_elements(spec: KernelSpec, image_shape: tuple) -> int:
    """Entries of the largest kernel array one image pair needs (1 for flat networks): the input band (the
    built-in layers only shrink the band radius and the image along the walk)."""
    plan = layer_plan(spec.layers, *(image_shape[:2] if len(image_shape) == 3 else (1, 1)))
    if starts_flat(plan):
        return 1
    h, w, rh, rw = plan[0]
    return h * w * (2 * rh + 1) * (2 * rw + 1)


def bytes_per_pair(spec: KernelSpec, image_shape: tuple, itemsize: int) -> int:
    return ARRAYS_PER_PAIR * pair_elements(spec, image_shape) * itemsize


def kernel_block_vjp(spec: KernelSpec, x1: jax.Array, stats1: tuple[jax.Array, ...], x2: jax.Array,
                     stats2: tuple[jax.Array, ...], cotangent: jax.Array, get: Get = "ntk",
                     wrt: tuple[bool, bool] = (True, True)) -> tuple[Any, ...]:
    """Vector-Jacobian product of :func:`kernel_block`.

    Args:
      cotangent: ``(b1, b2)``, e.g. ``dL/dK`` for this block.
      wrt: which sides to differentiate; a side not wanted returns ``None`` and costs nothing.
    Returns:
      ``(dx1, dstats1, dx2, dstats2)``: cotangents of the images (through the block only) and of their
      statistics. The full image gradient adds :func:`self_stats_vjp` of the statistics' cotangents,
      summed over every block the image appears in.
    """
    want1, want2 = wrt
    if want2 and not want1:  # through the transposed block, as in kernel_matrix_vjp
        dx2, dstats2, _, _ = kernel_block_vjp(spec, x2, stats2, x1, stats1, cotangent.T, get, (True, False))
        return None, None, dx2, dstats2
    args = [x1, stats1, x2, stats2]
    free = [i for i, want in zip((0, 1, 2, 3), (want1, want1, want2, want2)) if want]

    def fn(*free_args):
        full = list(args)
        for i, a in zip(free, free_args):
            full[i] = a
        return kernel_block(spec, *full, get=get)

    _, vjp = jax.vjp(fn, *[args[i] for i in free])
    grads = vjp(cotangent.astype(jnp.result_type(x1)))
    out = [None] * 4
    for i, g in zip(free, grads):
        out[i] = g
    return tuple(out)


def self_stats_vjp(spec: KernelSpec, x: jax.Array, stats_cotangent: Sequence[jax.Array]) -> jax.Array:
    """Cotangent of ``x`` from the cotangent of ``self_stats(spec, x)``. ``-> (b, ...)`` like ``x``."""
    _, vjp = jax.vjp(lambda z: self_stats(spec, z), x)
    return vjp(tuple(stats_cotangent))[0]


@dataclasses.dataclass(frozen=True)
class KernelFn:
    """A callable ``kernel_fn(x1, x2=None, get="ntk") -> (n1, n2)`` for one :class:`KernelSpec`.

    Inputs are NHWC images ``(n, H, W, C)`` (any ``(n, ...)`` for ``fc``, which flattens them) in the
    preprocessed space, float32 or float64; the output has the inputs' floating dtype. Works under
    ``jax.jit`` / ``jax.grad`` / ``jax.vjp``; peak memory stays near ``memory_budget_bytes``. ``x2=None``
    (or ``x2 is x1``) computes each image's self statistics once.
    """

    spec: KernelSpec = KernelSpec()
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    tile_bytes: int | None = None  # None: CPU_TILE_BYTES on a CPU, the memory budget elsewhere

    def __call__(self, x1: ArrayLike, x2: ArrayLike | None = None, get: Get = "ntk") -> jax.Array:
        if get not in ("ntk", "nngp"):
            raise KernelDistillError(f"get must be 'ntk' or 'nngp', got {get!r}")
        # compiled whole: op-by-op dispatch of the layer walk compiled 3x slower than one jit
        return _compiled_matrix(self.spec, get, self.tile_budget())(*float_pair(x1, x2, self.check_inputs))

    def jitted(self, get: Get = "ntk") -> Callable[..., jax.Array]:
        """``jax.jit(lambda x1, x2: self(x1, x2, get))``, cached: one compilation per kernel, ``get`` and
        input shape for the life of the process."""
        return _jitted_kernel(self, get)

    def tile_budget(self) -> int:
        tile = self.tile_bytes
        if tile is None:  # only the conv kernels' band arrays gain from cache-sized tiles
            on_cpu = jax.default_backend() == "cpu"
            tile = CPU_TILE_BYTES if (on_cpu and self.spec.is_conv) else self.memory_budget_bytes
        return min(self.memory_budget_bytes, tile)

    def check_inputs(self, x1: jax.Array, x2: jax.Array) -> None:
        check_inputs(self.spec, x1, x2)


@functools.lru_cache(maxsize=64)
def _compiled_matrix(spec: KernelSpec, get: Get, budget: int):
    return jax.jit(lambda x1, x2: kernel_matrix(spec, x1, x2, get, budget))


@functools.lru_cache(maxsize=64)
def _jitted_kernel(kernel_fn: KernelFn, get: Get):
    return jax.jit(lambda x1, x2: kernel_fn(x1, x2, get=get))


def make_kernel_fn(spec: KernelSpec | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                   tile_bytes: int | None = None, **spec_kwargs: Any) -> KernelFn | RandomFeatureKernelFn:
    """Build ``kernel_fn(x1, x2=None, get="ntk") -> (n1, n2)`` for an architecture.

    ``memory_budget_bytes`` bounds the memory of one tile of the computation (forward or backward);
    ``tile_bytes`` caps it further for speed (default: 16 MiB on a CPU, where cache-sized tiles are
    fastest, and no cap on accelerators).

    Example::

        kernel_fn = make_kernel_fn(architecture="convnet", depth=3)
        k = kernel_fn(x_train[:10], x_test[:20], get="ntk")   # (10, 20)

    A spec with ``random_features`` gives a
    :class:`~kernel_distill.kernels.random_features.RandomFeatureKernelFn` (same interface, NNGP only).
    """
    if spec is None:
        spec = KernelSpec(**spec_kwargs)
    elif spec_kwargs:
        spec = dataclasses.replace(spec, **spec_kwargs)
    if not (memory_budget_bytes > 0 and math.isfinite(memory_budget_bytes)):
        raise KernelDistillError("memory_budget_bytes must be positive")
    if tile_bytes is not None and tile_bytes <= 0:
        raise KernelDistillError("tile_bytes must be positive")
    if spec.random_features is not None:
        return RandomFeatureKernelFn(spec, int(memory_budget_bytes))
    return KernelFn(spec=spec, memory_budget_bytes=int(memory_budget_bytes), tile_bytes=tile_bytes)


def tiled_self_stats(spec: KernelSpec, x: jax.Array, budget: int) -> tuple[jax.Array, ...]:
    """:func:`self_stats` over chunks of ``x`` that fit ``budget`` (rematerialised in the backward pass)."""
    per_image = bytes_per_pair(spec, x.shape[1:], jnp.dtype(x.dtype).itemsize) // 2
    chunk = max(1, budget // max(1, per_image))
    return tiling.tiled(jax.checkpoint(lambda z: self_stats(spec, z)), (x,), chunk)


def kernel_matrix(spec: KernelSpec, x1: jax.Array, x2: jax.Array | None, get: Get, budget: int) -> jax.Array:
    """``(n1, n2)`` kernel matrix in tiles of at most ``budget`` bytes. ``x2=None`` means ``x1``."""
    stats1 = tiled_self_stats(spec, x1, budget)
    if x2 is None:
        return kernel_matrix_from_stats(spec, x1, stats1, x1, stats1, get, budget)
    return kernel_matrix_from_stats(spec, x1, stats1, x2, tiled_self_stats(spec, x2, budget), get, budget)


def _tile_shape(spec: KernelSpec, x1, n2: int, budget: int) -> tuple[int, int]:
    return tiling.block_sizes(len(x1), n2, bytes_per_pair(spec, x1.shape[1:], jnp.dtype(x1.dtype).itemsize),
                              budget)


def kernel_matrix_from_stats(spec: KernelSpec, x1: jax.Array, stats1: tuple[jax.Array, ...], x2: jax.Array,
                             stats2: tuple[jax.Array, ...], get: Get, budget: int) -> jax.Array:
    """``(n1, n2)`` kernel matrix from images and their :func:`self_stats`, in tiles of ``budget`` bytes."""
    n1, n2 = x1.shape[0], x2.shape[0]
    b1, b2 = _tile_shape(spec, x1, n2, budget)
    if b1 >= n1 and b2 >= n2:
        return kernel_block(spec, x1, stats1, x2, stats2, get)

    # Columns outside, rows inside: each x2 chunk is gathered into band layout once (partner_arrays) and
    # paired with every x1 row block.
    row_block = jax.checkpoint(lambda a, sa, partner: kernel_block_from_partner(spec, a, sa, partner, get))

    @jax.checkpoint  # or autodiff would keep every chunk's gathered arrays for the backward pass
    def column_block(b, sb):
        partner = partner_arrays(spec, b, sb)
        return tiling.tiled(lambda a, sa: row_block(a, sa, partner), (x1, stats1), b1).T  # (b2, n1)

    return tiling.tiled(column_block, (x2, stats2), b2).T


def _chunks(tree, block: int):
    """Pad axis 0 of every leaf to a multiple of ``block`` and split it: ``(n, ...) -> (m, block, ...)``."""
    def split(x):
        x = tiling.pad_rows(x, block)
        return x.reshape(-1, block, *x.shape[1:])
    return jax.tree_util.tree_map(split, tree)


def _unchunk(tree, n: int):
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:])[:n], tree)


def kernel_matrix_vjp(spec: KernelSpec, x1: jax.Array, stats1: tuple[jax.Array, ...], x2: jax.Array,
                      stats2: tuple[jax.Array, ...], cotangent: jax.Array, get: Get, budget: int,
                      wrt: tuple[bool, bool] = (True, True)) -> tuple[Any, Any, Any, Any]:
    """VJP of :func:`kernel_matrix_from_stats`, as a sum of block VJPs (the local backend of the block API).

    Args:
      cotangent: ``(n1, n2)``, e.g. ``dL/dK``.
      wrt: which sides to differentiate; a side not wanted returns ``(None, None)`` and costs nothing.
    Returns:
      ``(dx1, dstats1, dx2, dstats2)``, through the blocks only; add :func:`self_stats_vjp` of the summed
      statistics cotangents for the full image gradients. Blocks run one after another (``lax.scan``),
      each rematerialising its forward pass, so memory stays within one tile; each ``x2`` chunk is gathered
      (and its gather differentiated) once, not once per block.
    """
    want1, want2 = wrt
    if not (want1 or want2):
        return None, None, None, None
    if want2 and not want1:
        # K(x1, x2) = K(x2, x1)^T: differentiating the first side of the transposed matrix is 2.4x faster on a
        # CPU (28x28 ConvNet), as no gradient of the gathered partner arrays is accumulated over the rows.
        dx2, dstats2, _, _ = kernel_matrix_vjp(spec, x2, stats2, x1, stats1, cotangent.T, get, budget, (True, False))
        return None, None, dx2, dstats2
    n1, n2 = x1.shape[0], x2.shape[0]
    b1, b2 = _tile_shape(spec, x1, n2, budget)
    m1, m2 = -(-n1 // b1), -(-n2 // b2)
    rows, cols = _chunks((x1, stats1), b1), _chunks((x2, stats2), b2)
    ct = jnp.pad(cotangent.astype(x1.dtype), ((0, m1 * b1 - n1), (0, m2 * b2 - n2)))  # padded pairs count 0
    ct = ct.reshape(m1, b1, m2, b2).transpose(2, 0, 1, 3)  # (m2, m1, b1, b2)

    def block(a, sa, partner):
        return kernel_block_from_partner(spec, a, sa, partner, get)

    def column(row_grads, column_args):
        b, sb, ct_column = column_args
        if want2:
            partner, partner_vjp = jax.vjp(lambda z, sz: partner_arrays(spec, z, sz), b, sb)
        else:
            partner = partner_arrays(spec, b, sb)

        def row(partner_grad, row_args):
            a, sa, ct_block = row_args
            if want2:  # with x1: a VJP wanted for x2 alone went through the transposed matrix above
                _, vjp = jax.vjp(block, a, sa, partner)
                da, dsa, dp = vjp(ct_block)
                return jax.tree_util.tree_map(jnp.add, partner_grad, dp), (da, dsa)
            _, vjp = jax.vjp(lambda z, sz: block(z, sz, partner), a, sa)
            return partner_grad, vjp(ct_block)

        zero_partner = jax.tree_util.tree_map(jnp.zeros_like, partner) if want2 else None
        partner_grad, column_row_grads = jax.lax.scan(row, zero_partner, (*rows, ct_column))
        row_grads = jax.tree_util.tree_map(jnp.add, row_grads, column_row_grads)
        return row_grads, (partner_vjp(partner_grad) if want2 else None)

    zero_rows = jax.tree_util.tree_map(jnp.zeros_like, rows)
    row_grads, column_grads = jax.lax.scan(column, zero_rows, (*cols, ct))
    dx1, ds1 = _unchunk(row_grads, n1)
    dx2, ds2 = _unchunk(column_grads, n2) if want2 else (None, None)
    return dx1, ds1, dx2, ds2


def tiled_self_stats_vjp(spec: KernelSpec, x: jax.Array, stats_cotangent: Sequence[jax.Array],
                         budget: int) -> jax.Array:
    """Cotangent of ``x`` from that of ``tiled_self_stats(spec, x, budget)``, in chunks of ``budget`` bytes."""
    _, vjp = jax.vjp(lambda z: tiled_self_stats(spec, z, budget), x)
    return vjp(tuple(stats_cotangent))[0]
