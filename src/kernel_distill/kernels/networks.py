"""Finite networks of a layer tuple: the flax module that composes the layers' own finite rules.

Each layer says which parameters it has (:meth:`~kernel_distill.kernels.layers.Layer.parameters`) and how it
maps inputs to outputs (:meth:`~kernel_distill.kernels.layers.Layer.apply`, a pure function); this module only
creates those parameters in flax scopes and threads the activations through. Both the trained finite networks
(:mod:`kernel_distill.finite`) and the random-feature networks (:mod:`kernel_distill.kernels.random_features`)
are :class:`LayerNet`.
"""

from __future__ import annotations

import collections
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernel_distill.kernels.layers import FiniteSettings


class _LayerParameters(nn.Module):
    """One layer's parameters in a scope of their own (``specs``: its :class:`ParameterSpec` tuple), created in
    that order: the scope's name and the order fix the random draws."""

    specs: tuple

    @nn.compact
    def __call__(self) -> dict:
        return {spec.name: self.param(spec.name, jax.nn.initializers.normal(spec.std), spec.shape, jnp.float32)
                for spec in self.specs}


class LayerNet(nn.Module):
    """The finite network of a kernel architecture, built from the same layer tuple as the exact kernel.

    ``layers`` is a tuple of :mod:`kernel_distill.kernels.layers` objects (e.g. ``KernelSpec("convnet").layers``);
    every hidden affine layer gets ``width`` units or channels, a final one ``num_classes``. In the NTK
    parameterization with the kernel's ``W_std``/``b_std`` its output covariance over random initialisations
    tends to the kernel's NNGP as the width grows (tested in tests/test_kernels_montecarlo.py).
    ``(n, H, W, C) -> (n, num_classes)`` (or the last layer's output).

    Parameters live in ``params["_Dense_0"]``, ``params["_Conv_1"]``, ... (a scope per parameterised layer,
    numbered per kind), drawn in float32 even with 64-bit mode on, so a key gives the same network either way.
    Parameters of the KIP ConvNet: ``(9 C + 1) w`` for the first conv, ``(9 w + 1) w`` for each further conv,
    ``(w H' W' + 1) num_classes`` for the readout, ``H' = H // 2**depth``; of the FC net:
    ``(d + 1) w + (depth - 1)(w + 1) w + (w + 1) num_classes``.
    """

    layers: tuple
    num_classes: int
    width: int
    parameterization: str = "standard"
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        settings = FiniteSettings(self.parameterization, self.W_std, self.b_std)
        scopes_used: collections.Counter[str] = collections.Counter()
        for i, layer in enumerate(self.layers):
            features = self.num_classes if i == len(self.layers) - 1 else self.width
            specs = layer.parameters(x.shape[1:], features, settings)
            params = {}
            if specs:
                scope = layer.parameter_scope
                params = _LayerParameters(specs, name=f"{scope}_{scopes_used[scope]}")()
                scopes_used[scope] += 1
            x = layer.apply(params, x, settings)
        return x
