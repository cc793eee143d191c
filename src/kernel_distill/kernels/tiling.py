"""Block sizes under a memory budget, and evaluation of a function over row chunks with ``lax.map``."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Pad axis 0 up to a multiple by repeating the last row (never a degenerate all-zero input)."""
    n = x.shape[0]
    padded_n = -(-n // multiple) * multiple
    if padded_n == n:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], padded_n - n, axis=0)], axis=0)


def tiled(fn: Callable[..., Any], xs: Sequence, block: int) -> Any:
    """Apply ``fn`` to ``block``-row chunks of every array in the pytree ``xs`` (all sharing axis 0).

    Runs the chunks one after another with ``lax.map`` and returns ``fn``'s outputs stacked back to the
    original number of rows.
    """
    leaves = jax.tree_util.tree_leaves(xs)
    n = leaves[0].shape[0]
    block = max(1, min(block, n))
    if block == n:  # one chunk: no loop, so XLA sees (and can parallelise) the whole computation
        return fn(*xs)

    def to_chunks(x):
        x = pad_rows(x, block)
        return x.reshape(-1, block, *x.shape[1:])

    chunks = jax.tree_util.tree_map(to_chunks, tuple(xs))
    out = jax.lax.map(lambda args: fn(*args), chunks)
    return jax.tree_util.tree_map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def balanced(n: int, at_most: int) -> int:
    """The smallest block size that covers n in as few blocks of at most ``at_most`` as possible.

    E.g. n = 2000, at_most = 1920 gives 1000 (two blocks), not 1920 (two blocks padded to 3840 rows).
    """
    at_most = max(1, min(at_most, n))
    blocks = -(-n // at_most)
    return -(-n // blocks)


def block_sizes(n1: int, n2: int, bytes_per_pair: int, budget: int) -> tuple[int, int]:
    """A (b1, b2) tile with b1 * b2 * bytes_per_pair <= budget, as square as the inputs allow, and sized so
    that the tiles cover (n1, n2) with little padding."""
    pairs = max(1, budget // max(1, bytes_per_pair))
    b1 = balanced(n1, max(1, int(math.isqrt(pairs))))
    b2 = balanced(n2, max(1, pairs // b1))
    return b1, b2
