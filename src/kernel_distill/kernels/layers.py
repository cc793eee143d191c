"""Layers that carry their rules: each layer class defines, in one place, everything any consumer needs of it.

An architecture is a tuple of layer objects (:func:`serial`). Three consumers walk that one tuple and ask each
layer for its rule, as neural-tangents' ``stax`` pairs every layer's finite and infinite-width functions:

* the exact infinite-width kernel (:mod:`kernel_distill.kernels.exact`): :meth:`Layer.input_radius` (the band
  plan) and :meth:`Layer.kernel` (the NNGP/NTK step); a layer that needs per-image statistics (the ReLU needs
  each pixel's variance) sets ``needs_statistics`` and defines :meth:`Layer.statistic`,
  :meth:`Layer.self_kernel`, :meth:`Layer.partner_statistic` and :meth:`Layer.pair_kernel` instead;
* the finite networks (:class:`kernel_distill.kernels.networks.LayerNet`, trained by
  :mod:`kernel_distill.finite`): :meth:`Layer.parameters` (shapes and initial scales) and :meth:`Layer.apply`
  (a pure forward pass over arrays);
* the random-feature networks (:mod:`kernel_distill.kernels.random_features`): the same forward pass in the
  NTK parameterization, without the readout, with an :class:`InstanceNorm` layer after each conv when asked.

Shapes (:meth:`Layer.output_shape`, :meth:`Layer.min_input_size`) and where a layer may sit
(:meth:`Layer.check_placement`) are rules of the layer too. Adding a layer is one class here (or in user code:
tests/test_layers.py defines one in the test file); docs/KERNELS.md, "How to add a layer".

The built-in layers, in the NTK parameterization of neural-tangents and the KIP papers (weights ~ N(0, 1),
the pre-activation scaled by ``W_std / sqrt(fan_in)``, biases ``b_std * N(0, 1)``):

* :class:`Dense`: a fully connected layer on a flat input.
* :class:`Conv`: a 3x3 SAME convolution (zero padding), stride 1.
* :class:`Relu`: ``max(0, z)``.
* :class:`AvgPool`: 2x2 average pool, stride 2, VALID (an odd row or column is dropped).
* :class:`Flatten`: NHWC -> (N, H * W * C).
* :class:`InstanceNorm`: each image's channel normalised over positions. No closed-form kernel: random
  features only (``RandomFeatures(norm="instance")``) and finite networks.

Widths are not part of a layer: the kernel is the infinite-width limit, and a finite network takes a width of
its own. Weight and bias scales (``W_std``, ``b_std``) belong to the architecture (:class:`KernelSpec`) and
reach the rules through :class:`Step` and :class:`FiniteSettings`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels.bands import band_gather, box3, center, mask, pool
from kernel_distill.kernels.numerics import ZERO_NTK, affine, relu_kernels, std_and_inverse

if TYPE_CHECKING:
    from kernel_distill.kernels.numerics import Ntk


@dataclasses.dataclass(frozen=True)
class Step:
    """Where one layer sits in the exact kernel's walk (built by :mod:`kernel_distill.kernels.exact`).

    Attributes:
      before, after: ``(H, W, rh, rw)`` of the band entering and leaving the layer (``layer_plan``): spatial
        size and offset radius; ``None`` where the state is flat.
      w2, b2: ``W_std ** 2`` and ``b_std ** 2`` of the architecture's affine layers.
    """

    before: tuple | None
    after: tuple | None
    w2: float
    b2: float


@dataclasses.dataclass(frozen=True)
class FiniteSettings:
    """What every layer of one finite network shares: ``"ntk"`` or ``"standard"`` parameterization and the
    weight and bias scales."""

    parameterization: str = "ntk"
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One parameter array of a finite layer: drawn as ``std * N(0, 1)`` in float32 (so a key gives the same
    network with and without 64-bit mode)."""

    name: str
    shape: tuple
    std: float


def map_ntk(fn: Callable, ntk: Ntk) -> Ntk:
    """``fn(ntk)``, passing through ``None`` (only the NNGP is wanted) and ``ZERO_NTK`` (no affine layer yet:
    a linear map of zero is zero)."""
    return ntk if ntk is None or ntk is ZERO_NTK else fn(ntk)


@dataclasses.dataclass(frozen=True)
class Layer:
    """Base of all layers. A subclass is a small frozen dataclass; the defaults below suit a pointwise layer
    without parameters that keeps shapes (only :meth:`kernel` and :meth:`apply` are then left to write).

    Class attributes (what the generic walks need to know, instead of the layer's type):
      takes: ``"image"`` (needs ``(H, W, C)`` inputs), ``"flat"`` (needs ``(D,)``) or ``"any"``.
      affine: a weighted layer whose outputs are Gaussian at infinite width (a ReLU may follow it).
      flattens: turns images into vectors (an architecture does it once).
      needs_gaussian_input: the exact rule assumes Gaussian pre-activations (an affine layer must come first).
      needs_statistics: the exact rule needs per-image statistics (see :meth:`statistic`).
      parameter_scope: the finite network's parameter collection prefix (``"_Dense"`` -> ``"_Dense_0"``, ...);
        the names the flax submodules had, so parameter trees and random draws are as before.
    """

    takes: ClassVar[str] = "any"
    affine: ClassVar[bool] = False
    flattens: ClassVar[bool] = False
    needs_gaussian_input: ClassVar[bool] = False
    needs_statistics: ClassVar[bool] = False
    parameter_scope: ClassVar[str] = ""

    # -- where the layer may sit, and shapes --------------------------------------------------------------

    def check_placement(self, flat: bool, after_affine: bool) -> None:
        """Raise a one-line :class:`KernelDistillError` if the layer cannot follow a state that is ``flat``
        (after a Flatten) and ``after_affine`` (some affine layer came before)."""
        name = type(self).__name__
        if self.takes == "image" and flat:
            raise KernelDistillError(f"{name} after Flatten")
        if self.takes == "flat" and not flat:
            raise KernelDistillError(f"{name} before Flatten")
        if self.needs_gaussian_input and not after_affine:
            raise KernelDistillError(f"a {name} needs an affine layer before it")

    def output_shape(self, shape: tuple, features: int) -> tuple:
        """Per-example output shape for an input of ``shape`` (``(H, W, C)`` or ``(D,)``), with ``features``
        units or channels if the layer is affine."""
        return shape

    def min_input_size(self, size: int) -> int:
        """Smallest input height/width for an output of height/width at least ``size``."""
        return size

    # -- the exact kernel ---------------------------------------------------------------------------------

    def input_radius(self, rh: int, rw: int) -> tuple[int, int]:
        """The band radii the layer needs of its input for output radii ``(rh, rw)`` (before the image-size cap)."""
        return rh, rw

    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Step) -> tuple[jax.Array, Ntk]:
        """The exact NNGP/NTK step: ``(nngp, ntk) -> (nngp', ntk')``.

        ``nngp``: ``(b1, b2)`` when flat, ``(b1, b2, 2rh+1, 2rw+1, H, W)`` as a band (``step.before``); in the
        self pass the same without ``b2``. ``ntk``: like ``nngp``, or ``None`` (not wanted) or ``ZERO_NTK``
        (before any affine layer; :func:`map_ntk`). Pure and traceable; the dtype of ``nngp`` is kept.
        """
        raise KernelDistillError(f"{type(self).__name__} has no exact kernel rule")

    # Layers with needs_statistics = True define these four instead of kernel().

    def statistic(self, nngp: jax.Array, step: Step) -> jax.Array:
        """Self pass: what the layer needs of each image, from the image's own covariance ``nngp``."""
        raise NotImplementedError

    def self_kernel(self, nngp: jax.Array, statistic: jax.Array, step: Step) -> jax.Array:
        """Self pass: the NNGP step of an image with itself, given its :meth:`statistic`."""
        raise NotImplementedError

    def partner_statistic(self, statistic: jax.Array, step: Step) -> Any:
        """The statistic of a block's second images in the form every pair reads (gathered once per image)."""
        raise NotImplementedError

    def pair_kernel(self, nngp: jax.Array, ntk: Ntk, statistic1: jax.Array, partner2: Any,
                    step: Step) -> tuple[jax.Array, Ntk]:
        """Pair pass: the NNGP/NTK step, from the first images' :meth:`statistic` and the second images'
        :meth:`partner_statistic`."""
        raise NotImplementedError

    # -- the finite network -------------------------------------------------------------------------------

    def parameters(self, input_shape: tuple, features: int, settings: FiniteSettings) -> tuple:
        """The layer's :class:`ParameterSpec` tuple for a per-example input of ``input_shape``."""
        return ()

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        """The finite forward pass: ``(n, ...) -> (n, ...)``, ``params`` as :meth:`parameters` named them."""
        raise KernelDistillError(f"{type(self).__name__} has no finite forward pass")


@dataclasses.dataclass(frozen=True)
class _Affine(Layer):
    """What Dense and Conv share: ``W_std / sqrt(fan_in) * (W x) + b_std * b`` (NTK parameterization) or
    ``W x + b`` with ``W ~ N(0, W_std^2 / fan_in)``, ``b ~ N(0, b_std^2)`` (standard); exact rule
    ``nngp' = W^2 A(nngp) + b^2``, ``ntk' = nngp' + W^2 A(ntk)``."""

    affine: ClassVar[bool] = True

    def fan_in(self, input_shape: tuple) -> int:
        raise NotImplementedError

    def weight_shape(self, input_shape: tuple, features: int) -> tuple:
        raise NotImplementedError

    def linear(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """The unscaled ``W x``."""
        raise NotImplementedError

    def parameters(self, input_shape: tuple, features: int,
                   settings: FiniteSettings) -> tuple[ParameterSpec, ParameterSpec]:
        fan_in = self.fan_in(input_shape)
        if settings.parameterization == "ntk":
            w_std, b_std = 1.0, 1.0
        else:
            w_std, b_std = settings.W_std / math.sqrt(fan_in), settings.b_std
        return (ParameterSpec("kernel", self.weight_shape(input_shape, features), w_std),
                ParameterSpec("bias", (features,), b_std))

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        if settings.parameterization == "ntk":
            scale, bias_scale = settings.W_std / math.sqrt(self.fan_in(x.shape[1:])), settings.b_std
        else:
            scale, bias_scale = 1.0, 1.0
        return scale * self.linear(x, params["kernel"]) + bias_scale * params["bias"]


@dataclasses.dataclass(frozen=True)
class Dense(_Affine):
    """Fully connected layer, ``W_std / sqrt(fan_in) * W x + b_std * b``."""

    takes: ClassVar[str] = "flat"
    parameter_scope: ClassVar[str] = "_Dense"

    def output_shape(self, shape: tuple, features: int) -> tuple:
        return (features,)

    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Step) -> tuple[jax.Array, jax.Array | None]:
        return affine(nngp, ntk, step.w2, step.b2)

    def fan_in(self, input_shape: tuple) -> int:
        return input_shape[-1]

    def weight_shape(self, input_shape: tuple, features: int) -> tuple:
        return (input_shape[-1], features)

    def linear(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        return x @ weights


@dataclasses.dataclass(frozen=True)
class Conv(_Affine):
    """3x3 SAME convolution with zero padding, stride 1, ``W_std / sqrt(9 C_in)`` scaling.

    Exact rule: the 3x3 average of the band over positions (offsets kept: a conv keeps ``q - p``), masked where
    the partner position is outside the image (the zero padding)."""

    size: int = 3

    takes: ClassVar[str] = "image"
    parameter_scope: ClassVar[str] = "_Conv"

    def check_placement(self, flat: bool, after_affine: bool) -> None:
        super().check_placement(flat, after_affine)
        if self.size != 3:
            raise KernelDistillError("only 3x3 convolutions and 2x2 pools are implemented")

    def output_shape(self, shape: tuple, features: int) -> tuple:
        return (*shape[:2], features)

    # step: a Step whose ``before`` is set (a conv sees images); Any, as mypy cannot narrow that Optional here
    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Any) -> tuple[jax.Array, jax.Array | None]:
        h, w, rh, rw = step.before
        return affine(nngp, ntk, step.w2, step.b2, box3, mask(h, w, rh, rw, nngp.dtype))

    def fan_in(self, input_shape: tuple) -> int:
        return 9 * input_shape[-1]

    def weight_shape(self, input_shape: tuple, features: int) -> tuple:
        return (3, 3, input_shape[-1], features)

    def linear(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        # The parameters are drawn in float32; a float64 input (64-bit mode) is convolved in float64.
        return jax.lax.conv_general_dilated(x, weights.astype(x.dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


@dataclasses.dataclass(frozen=True)
class Relu(Layer):
    """Elementwise ReLU. Exact rule: the arc-cosine kernel (:func:`kernel_distill.kernels.numerics.relu_kernels`),
    which needs each position's pre-activation variance: the per-image statistic."""

    needs_gaussian_input: ClassVar[bool] = True
    needs_statistics: ClassVar[bool] = True

    def statistic(self, nngp: jax.Array, step: Step) -> jax.Array:
        """The pre-activation variance: ``(b,)`` flat, ``(b, H, W)`` (offset 0 of the band) spatial."""
        return nngp if step.before is None else center(nngp)

    def self_kernel(self, nngp: jax.Array, variance: jax.Array, step: Step) -> jax.Array:
        if step.before is None:  # E[relu(z)^2] = var / 2, exactly
            return nngp / 2.0
        std, inv = std_and_inverse(variance)
        own = (std[..., None, None, :, :], inv[..., None, None, :, :])
        partner = (band_gather(std, *step.before[2:]), band_gather(inv, *step.before[2:]))
        return relu_kernels(nngp, *own, *partner, None)[0]

    def partner_statistic(self, variance: jax.Array, step: Step) -> tuple[jax.Array, jax.Array]:
        """``(std, 1/std)``: ``(b2,)`` flat, or gathered at the partner positions ``(b2, Rh, Rw, H, W)``."""
        std, inv = std_and_inverse(variance)
        if step.before is not None:
            std, inv = band_gather(std, *step.before[2:]), band_gather(inv, *step.before[2:])
        return std, inv

    # ntk: an array or None (an affine layer comes first, so never ZERO_NTK); Any, as mypy cannot narrow that Ntk
    def pair_kernel(self, nngp: jax.Array, ntk: Any, variance1: jax.Array, partner2: tuple[jax.Array, jax.Array],
                    step: Step) -> tuple[jax.Array, jax.Array | None]:
        std1, inv1 = std_and_inverse(variance1)
        std2, inv2 = partner2
        if step.before is not None:
            own = (std1[:, None, None, None], inv1[:, None, None, None])
        else:
            own = (std1[:, None], inv1[:, None])
        return relu_kernels(nngp, *own, std2[None], inv2[None], ntk)

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        return jax.nn.relu(x)


@dataclasses.dataclass(frozen=True)
class AvgPool(Layer):
    """2x2 average pool, stride 2, VALID padding. Exact rule: output offset ``D`` reads input offsets
    ``2 D + {-1, 0, 1}`` (:func:`kernel_distill.kernels.bands.pool`)."""

    size: int = 2

    takes: ClassVar[str] = "image"

    def check_placement(self, flat: bool, after_affine: bool) -> None:
        super().check_placement(flat, after_affine)
        if self.size != 2:
            raise KernelDistillError("only 3x3 convolutions and 2x2 pools are implemented")

    def output_shape(self, shape: tuple, features: int) -> tuple:
        return (shape[0] // 2, shape[1] // 2, *shape[2:])

    def min_input_size(self, size: int) -> int:
        return 2 * size

    def input_radius(self, rh: int, rw: int) -> tuple[int, int]:
        return 2 * rh + 1, 2 * rw + 1

    # step: a Step whose ``after`` is set (a pool sees images); Any, as mypy cannot narrow that Optional here
    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Any) -> tuple[jax.Array, Ntk]:
        return pool(nngp, step.after), map_ntk(lambda k: pool(k, step.after), ntk)

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        # flax.linen.avg_pool's arithmetic (a windowed sum, then a division), so networks are as before
        window = (1, 2, 2, 1)
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / np.prod((2, 2))


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """NHWC -> (N, H * W * C). Exact rule: the readout after it sees equal positions of both images only, so
    the kernel is the mean over positions of the band's offset 0."""

    flattens: ClassVar[bool] = True

    def check_placement(self, flat: bool, after_affine: bool) -> None:
        if flat:
            raise KernelDistillError("an architecture can flatten only once")

    def output_shape(self, shape: tuple, features: int) -> tuple:
        return (int(np.prod(shape)),)

    def input_radius(self, rh: int, rw: int) -> tuple[int, int]:
        return 0, 0

    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Step) -> tuple[jax.Array, Ntk]:
        def positions_mean(k):
            return jnp.mean(center(k), axis=(-2, -1))

        return positions_mean(nngp), map_ntk(positions_mean, ntk)

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        return x.reshape(len(x), -1)


def instance_normalize(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """``(n, H, W, C)``: each image's channel shifted and scaled to mean 0, variance 1 over its positions.

    What the evaluation ConvNet's per-channel GroupNorm computes at initialisation (scale 1, shift 0)."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    variance = jnp.var(x, axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + epsilon)


@dataclasses.dataclass(frozen=True)
class InstanceNorm(Layer):
    """Each image's channel normalised to mean 0, variance 1 over its positions, no learned scale or shift
    (:func:`instance_normalize`): what ``RandomFeatures(norm="instance")`` puts after each conv of the random
    networks. The NNGP of such a network has no closed form here, so the exact kernel refuses it."""

    takes: ClassVar[str] = "image"

    def kernel(self, nngp: jax.Array, ntk: Ntk, step: Step) -> tuple[jax.Array, Ntk]:
        raise KernelDistillError("InstanceNorm has no closed-form kernel: use it through random features "
                                 "(RandomFeatures(norm='instance')) or in a finite network")

    def apply(self, params: dict, x: jax.Array, settings: FiniteSettings) -> jax.Array:
        return instance_normalize(x)


# ----------------------------------------------------------------------------------------------------
# Whole layer tuples.


def validate_layers(layers: tuple) -> None:
    """What every consumer supports: layers that take images (Conv, AvgPool, ...), one Flatten, then layers
    that take vectors (Dense, ...), ending in a Dense readout; each layer's own placement rule
    (:meth:`Layer.check_placement`) holds, e.g. an affine layer comes before any ReLU."""
    if not layers or not isinstance(layers[-1], Dense):
        raise KernelDistillError("an architecture must end in a Dense readout")
    flat = after_affine = False
    for layer in layers:
        if not isinstance(layer, Layer):
            raise KernelDistillError(f"unknown layer {layer!r}")
        layer.check_placement(flat, after_affine)
        flat = flat or layer.flattens
        after_affine = after_affine or layer.affine


def serial(*layers: Layer) -> tuple:
    """Compose layers into an architecture: the validated tuple (``serial(Conv(), Relu(), Flatten(), Dense())``)."""
    validate_layers(layers)
    return tuple(layers)


def needs_images(layers: tuple) -> bool:
    """Whether the network takes NHWC images (it convolves, pools or normalises over positions)."""
    return any(layer.takes == "image" for layer in layers)


def min_spatial_size(layers: tuple) -> int:
    """Smallest image height/width the network accepts (each 2x2 pool halves it, VALID)."""
    size = 1
    for layer in reversed(layers):
        size = layer.min_input_size(size)
    return size


def output_shape(layers: tuple, input_shape: tuple, width: int) -> tuple:
    """Per-example output shape of a finite network of ``layers`` whose affine layers all have ``width``
    units or channels."""
    shape = tuple(input_shape)
    for layer in layers:
        shape = layer.output_shape(shape, width)
    return shape


__all__ = ["AvgPool", "Conv", "Dense", "FiniteSettings", "Flatten", "InstanceNorm", "Layer", "ParameterSpec", "Relu",
           "Step", "instance_normalize", "map_ntk", "min_spatial_size", "needs_images", "output_shape", "serial",
           "validate_layers"]
