"""The NNGP of an architecture approximated by the readout features of a few random finite networks.

RFAD (Loo, Hasani, Amini & Rus, NeurIPS 2022) replaced KIP's exact ConvNet kernel by the features of
random finite ConvNets: for ``M`` networks of width ``W``, drawn from the NTK-parameterised initialisation
of :class:`kernel_distill.kernels.networks.LayerNet` (the same layer tuple as the exact kernel, each layer's
own finite rule; :func:`feature_layers`), let ``phi_m(x)`` be network ``m``'s input to its Dense readout
(``fan_in`` entries). The readout's output covariance is
``W_std^2 / fan_in * phi(x) . phi(x') + b_std^2``, so with the feature vector

    Phi(x) = [W_std / sqrt(M * fan_in) * phi_1(x), ..., W_std / sqrt(M * fan_in) * phi_M(x), b_std]

``Phi(x) . Phi(x')`` is an unbiased Monte-Carlo estimate of the finite networks' readout covariance,
which tends to the exact infinite-width NNGP as ``W`` grows; its relative error falls like
``1 / sqrt(M * W)`` (tested against the exact kernel). Only the NNGP is approximated (``get="nngp"``).

A kernel matrix is then ``Phi(x1) Phi(x2)^T``: ``O(n * cost of M networks)`` instead of ``O(n1 * n2 *
pixels^2)``, and KRR can be solved in feature space (:func:`kernel_distill.krr.feature_predictions`) when
there are more support points than features. KIP's loss through these features is
:func:`kernel_distill.objective.random_feature_loss_and_gradients`.

Which networks: :class:`RandomFeatures` ``seed`` fixes them for evaluation (a file made with the kernel
re-creates it exactly); KIP draws fresh networks from the run's key every step by default (see
docs/KERNELS.md: resampling is part of why such sets transfer to finite networks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import tiling
from kernel_distill.kernels.inputs import check_inputs, float_pair
from kernel_distill.kernels.layers import output_shape
from kernel_distill.kernels.spec import (  # noqa: F401  (check_random_features: its old home was here)
    MAX_RANDOM_FEATURES, RF_NORM_LAYERS, KernelSpec, RandomFeatures, check_random_features)

if TYPE_CHECKING:
    from jax.typing import ArrayLike, DTypeLike

# Arrays alive per image and model in the widest layer of a forward pass (activation, pre-activation,
# conv output, pooled copy): a generous round number keeps the memory budget an upper bound.
ARRAYS_PER_IMAGE = 4


def _random_features(spec: KernelSpec) -> RandomFeatures:
    if spec.random_features is None:
        raise KernelDistillError("this KernelSpec has no random_features")
    return spec.random_features


def feature_layers(spec: KernelSpec) -> tuple:
    """The random networks' layers: the architecture without its Dense readout and, for
    ``RandomFeatures(norm="instance")``, an :class:`~kernel_distill.kernels.layers.InstanceNorm` after each
    affine layer on images (each conv, before its ReLU)."""
    norm_layer = RF_NORM_LAYERS[_random_features(spec).norm]
    layers = []
    for layer in spec.layers[:-1]:
        layers.append(layer)
        if norm_layer is not None and layer.affine and layer.takes == "image":
            layers.append(norm_layer())
    return tuple(layers)


def _feature_net(spec: KernelSpec):
    """The finite network (:class:`~kernel_distill.kernels.networks.LayerNet`) up to its Dense readout."""
    # Imported here, not at module level: flax takes ~0.7 s to import, and only random features need it
    # (the exact kernels, and so `import kernel_distill`, do not). No import cycle: networks needs only layers.
    from kernel_distill.kernels.networks import LayerNet

    return LayerNet(feature_layers(spec), num_classes=0, width=_random_features(spec).width, parameterization="ntk",
                    W_std=spec.W_std, b_std=spec.b_std)


def readout_fan_in(spec: KernelSpec, image_shape: tuple) -> int:
    """Entries of one network's readout input ``phi_m(x)`` for images of ``image_shape`` ``(H, W, C)``."""
    return int(np.prod(output_shape(feature_layers(spec), image_shape, _random_features(spec).width)))


def feature_dimension(spec: KernelSpec, image_shape: tuple) -> int:
    """Length of ``Phi(x)``: ``M * fan_in`` network features plus the bias feature."""
    return _random_features(spec).models * readout_fan_in(spec, image_shape) + 1


def network_params(spec: KernelSpec, key: jax.Array, image_shape: tuple, dtype: DTypeLike = jnp.float32) -> Any:
    """Parameters of the ``M`` random networks drawn from ``key``, stacked on a leading axis of size ``M``.

    Drawn in float32 and then cast, so a key gives the same networks in float32 and float64 runs.

    One network after another (``lax.map``), not ``vmap``: the same bits, and XLA's CPU backend compiles the
    batched random draws about 3x more slowly (a 4-network convnet depth 2: 19.9 s against 6.8 s, 2-core CPU beside two other jobs), which was
    most of the compile time of every program with random features in it (a kernel matrix, a KIP step)."""
    net = _feature_net(spec)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    keys = jax.random.split(key, _random_features(spec).models)
    params = jax.lax.map(lambda k: net.init(k, dummy), keys)
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def fixed_network_params(spec: KernelSpec, image_shape: tuple, dtype: DTypeLike = jnp.float32) -> Any:
    """The evaluation networks: drawn from ``PRNGKey(spec.random_features.seed)``."""
    return network_params(spec, jax.random.PRNGKey(_random_features(spec).seed), image_shape, dtype)


def image_chunk(spec: KernelSpec, image_shape: tuple, itemsize: int, budget: int) -> int:
    """Images per chunk so that one model's forward pass over a chunk stays within ``budget`` bytes."""
    width = _random_features(spec).width
    pixels = image_shape[0] * image_shape[1] if spec.is_conv else 1
    per_image = ARRAYS_PER_IMAGE * pixels * max(width, image_shape[-1]) * itemsize
    return max(1, budget // max(1, per_image))


def features(spec: KernelSpec, params: Any, x: jax.Array, budget: int = 512 * 2**20) -> jax.Array:
    """``Phi(x)``: ``(n, ...)`` images -> ``(n, M * fan_in + 1)`` features, in ``x``'s dtype.

    Models run one after another and images in chunks of at most ``budget`` bytes of activations
    (``lax.map``), so memory does not grow with ``M`` or ``n``. Differentiable in ``x``.
    """
    net = _feature_net(spec)
    models = _random_features(spec).models
    chunk = image_chunk(spec, x.shape[1:], jnp.dtype(x.dtype).itemsize, budget)

    def one_model(p):  # (n, fan_in)
        return tiling.tiled(lambda z: net.apply(p, z).reshape(z.shape[0], -1), (x,), chunk)

    phi = jax.lax.map(one_model, params)  # (M, n, fan_in)
    fan_in = phi.shape[-1]
    scale = spec.W_std / math.sqrt(models * fan_in)
    phi = jnp.transpose(phi, (1, 0, 2)).reshape(x.shape[0], models * fan_in) * scale
    bias = jnp.full((x.shape[0], 1), spec.b_std, phi.dtype)
    return jnp.concatenate([phi, bias], axis=1).astype(x.dtype)


def gram(phi1: jax.Array, phi2: jax.Array) -> jax.Array:
    """``Phi1 Phi2^T`` at full precision: ``(n1, D), (n2, D) -> (n1, n2)``."""
    return jnp.matmul(phi1, phi2.T, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class RandomFeatureKernelFn:
    """``kernel_fn(x1, x2=None, get="nngp") -> (n1, n2)`` for a :class:`KernelSpec` with ``random_features``.

    The same interface as :class:`kernel_distill.kernels.KernelFn` (``jitted``, ``tile_budget``,
    ``check_inputs``), with the fixed evaluation networks of ``spec.random_features.seed``; plus
    :meth:`features` for KRR in feature space. Inputs ``(n, H, W, C)`` float32 or float64.
    """

    spec: KernelSpec
    memory_budget_bytes: int = 512 * 2**20

    def __post_init__(self):
        if self.spec.random_features is None:
            raise KernelDistillError("RandomFeatureKernelFn needs a KernelSpec with random_features")

    def tile_budget(self) -> int:
        return self.memory_budget_bytes

    def check_inputs(self, x1: jax.Array, x2: jax.Array) -> None:
        check_inputs(self.spec, x1, x2)

    def feature_dimension(self, image_shape: tuple) -> int:
        return feature_dimension(self.spec, image_shape)

    def features(self, x: ArrayLike) -> jax.Array:
        """``Phi(x)`` of the fixed networks: ``(n, ...) -> (n, D)``, compiled once per shape and dtype."""
        x = self._as_float(jnp.asarray(x))
        return _compiled_features(self.spec, self.memory_budget_bytes)(x)

    def __call__(self, x1: ArrayLike, x2: ArrayLike | None = None, get: str = "nngp") -> jax.Array:
        check_get(get)
        return _compiled_matrix(self.spec, self.memory_budget_bytes)(*float_pair(x1, x2, self.check_inputs))

    def jitted(self, get: str = "nngp") -> Callable[..., jax.Array]:
        check_get(get)
        return _compiled_matrix(self.spec, self.memory_budget_bytes)

    @staticmethod
    def _as_float(x):
        return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def check_get(get: str) -> None:
    if get != "nngp":
        raise KernelDistillError(f"the random-feature kernel approximates the NNGP only; got get={get!r} "
                                 f"(use --get nngp)")


def matrix(spec: KernelSpec, x1: jax.Array, x2: jax.Array | None, budget: int) -> jax.Array:
    """``Phi(x1) Phi(x2)^T`` with the fixed networks; ``x2=None`` means ``x1`` (features computed once)."""
    params = fixed_network_params(spec, x1.shape[1:], x1.dtype)
    phi1 = features(spec, params, x1, budget)
    phi2 = phi1 if x2 is None else features(spec, params, x2, budget)
    return gram(phi1, phi2)


@functools.lru_cache(maxsize=64)
def _compiled_matrix(spec: KernelSpec, budget: int):
    return jax.jit(lambda x1, x2: matrix(spec, x1, x2, budget))


@functools.lru_cache(maxsize=64)
def _compiled_features(spec: KernelSpec, budget: int):
    return jax.jit(lambda x: features(spec, fixed_network_params(spec, x.shape[1:], x.dtype), x, budget))


__all__ = ["RandomFeatureKernelFn", "feature_dimension", "features", "fixed_network_params", "gram",
           "network_params", "readout_fan_in"]
