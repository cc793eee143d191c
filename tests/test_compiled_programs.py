"""benchmarks/compiled_programs.py: two programs that differ only in names and source locations compare equal,
and any change to what they compute does not."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def programs():
    sys.path.insert(0, str(REPO / "benchmarks"))  # as when the script runs: it imports its sibling benchmarks
    try:
        spec = importlib.util.spec_from_file_location("compiled_programs", REPO / "benchmarks" / "compiled_programs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def _compiled(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def scaled_softplus(x, w):
    return jnp.sum(jax.nn.softplus(x @ w) * 2.0, axis=0)


def renamed_helper(a, b):  # the same computation, written elsewhere under other names
    product = a @ b
    return jnp.sum(jax.nn.softplus(product) * 2.0, axis=0)


def test_names_and_source_locations_do_not_count(programs):
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
    first, second = _compiled(scaled_softplus, x, w), _compiled(renamed_helper, x, w)
    assert first != second  # the raw texts differ: metadata names the Python function and line
    assert programs.normalized_program(first) == programs.normalized_program(second)


def test_a_changed_computation_or_shape_is_a_different_program(programs):
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
    base = programs.normalized_program(_compiled(scaled_softplus, x, w))
    other_constant = programs.normalized_program(_compiled(lambda a, b: jnp.sum(jax.nn.softplus(a @ b) * 3.0, 0), x, w))
    other_shape = programs.normalized_program(_compiled(scaled_softplus, jnp.ones((9, 4)), w))
    other_op = programs.normalized_program(_compiled(lambda a, b: jnp.sum(jax.nn.relu(a @ b) * 2.0, 0), x, w))
    assert len({base, other_constant, other_shape, other_op}) == 4
