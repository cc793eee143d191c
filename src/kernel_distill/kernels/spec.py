"""Architectures as lists of layers, and the :class:`KernelSpec` that names one.

One definition serves every consumer: the exact infinite-width kernel (:mod:`kernel_distill.kernels.exact`),
the finite flax networks (:mod:`kernel_distill.finite`) and the Monte-Carlo tests all walk the same tuple
of layer objects. A new architecture is one function in :data:`ARCHITECTURE_REGISTRY`.

Layers (all in the NTK parameterization of neural-tangents and the KIP papers: weights ~ N(0, 1), the
pre-activation scaled by ``W_std / sqrt(fan_in)``, biases ``b_std * N(0, 1)``):

* :class:`Dense`: a fully connected layer on a flat input.
* :class:`Conv`: a 3x3 SAME convolution (zero padding), stride 1.
* :class:`Relu`: ``max(0, z)``.
* :class:`AvgPool`: 2x2 average pool, stride 2, VALID (an odd row or column is dropped).
* :class:`Flatten`: NHWC -> (N, H * W * C).

Widths are not part of a layer: the kernel is the infinite-width limit, and the finite networks take a
width of their own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from kernel_distill.errors import KernelDistillError


@dataclasses.dataclass(frozen=True)
class Dense:
    """Fully connected layer, ``W_std / sqrt(fan_in) * W x + b_std * b``."""


@dataclasses.dataclass(frozen=True)
class Conv:
    """3x3 SAME convolution with zero padding, stride 1, ``W_std / sqrt(9 C_in)`` scaling."""

    size: int = 3


@dataclasses.dataclass(frozen=True)
class Relu:
    """Elementwise ReLU."""


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """2x2 average pool, stride 2, VALID padding."""

    size: int = 2


@dataclasses.dataclass(frozen=True)
class Flatten:
    """NHWC -> (N, H * W * C)."""


Layer = Dense | Conv | Relu | AvgPool | Flatten
AFFINE_LAYERS = (Dense, Conv)


MAX_DEPTH = 100


def fc_layers(depth: int) -> tuple:
    """``depth`` hidden Dense + ReLU layers, then a Dense readout."""
    return (Flatten(),) + (Dense(), Relu()) * depth + (Dense(),)


def convnet_layers(depth: int) -> tuple:
    """The KIP ConvNet: 3x3 conv + ReLU, then ``depth`` blocks of (conv, ReLU, 2x2 average pool), readout."""
    return (Conv(), Relu()) + convnet3_layers(depth)


def convnet3_layers(depth: int) -> tuple:
    """The KIP ConvNet without the first conv + ReLU: ``depth`` blocks of (conv, ReLU, pool), readout."""
    return (Conv(), Relu(), AvgPool()) * depth + (Flatten(), Dense())


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A registered architecture: ``layers(depth)`` builds its layer tuple."""

    layers: Callable[[int], tuple]
    default_depth: int
    min_depth: int
    description: str


ARCHITECTURE_REGISTRY: dict[str, Architecture] = {
    "fc": Architecture(fc_layers, 1, 0, "depth x (Dense, ReLU), Dense readout"),
    "convnet": Architecture(convnet_layers, 3, 1,
                            "conv, ReLU, depth x (conv, ReLU, 2x2 avg pool), flatten, Dense readout (KIP ConvNet)"),
    "convnet3": Architecture(convnet3_layers, 3, 1,
                             "depth x (conv, ReLU, 2x2 avg pool), flatten, Dense readout"),
}
ARCHITECTURES = tuple(ARCHITECTURE_REGISTRY)  # the built-in ones; the registry may hold more


def register_architecture(name: str, layers: Callable[[int], tuple], default_depth: int, min_depth: int = 0,
                          description: str = "") -> None:
    """Add an architecture: ``layers(depth)`` must return a tuple of layer objects (see the module doc).

    The exact kernel (:class:`KernelSpec` ``(name, depth)``) and the finite network
    (:class:`kernel_distill.finite.LayerNet`) then both accept it.
    """
    if name in ARCHITECTURE_REGISTRY:
        raise KernelDistillError(f"architecture {name!r} is already registered")
    if not isinstance(layers(default_depth), tuple):
        raise KernelDistillError("layers(depth) must return a tuple")
    validate_layers(layers(default_depth))
    ARCHITECTURE_REGISTRY[name] = Architecture(layers, default_depth, min_depth, description)


def validate_layers(layers: tuple) -> None:
    """The exact kernel supports: spatial layers (Conv, ReLU, AvgPool), one Flatten, then flat layers
    (Dense, ReLU), ending in a Dense readout; the first affine layer comes before any ReLU."""
    if not layers or not isinstance(layers[-1], Dense):
        raise KernelDistillError("an architecture must end in a Dense readout")
    flat = False
    seen_affine = False
    for layer in layers:
        if not isinstance(layer, (Dense, Conv, Relu, AvgPool, Flatten)):
            raise KernelDistillError(f"unknown layer {layer!r}")
        if isinstance(layer, Flatten):
            if flat:
                raise KernelDistillError("an architecture can flatten only once")
            flat = True
        elif isinstance(layer, (Conv, AvgPool)) and flat:
            raise KernelDistillError(f"{type(layer).__name__} after Flatten")
        elif isinstance(layer, Dense) and not flat:
            raise KernelDistillError("Dense before Flatten")
        elif isinstance(layer, Relu) and not seen_affine:
            raise KernelDistillError("a ReLU needs an affine layer before it")
        if isinstance(layer, (Conv, AvgPool)) and (layer.size != (3 if isinstance(layer, Conv) else 2)):
            raise KernelDistillError("only 3x3 convolutions and 2x2 pools are implemented")
        seen_affine = seen_affine or isinstance(layer, AFFINE_LAYERS)


def _from_strict_dict(cls, d, subject: str, fields_of: str):
    """``cls(**d)`` for a dataclass, refusing a non-dict or an unknown key with one line naming the known ones."""
    if not isinstance(d, dict):
        raise KernelDistillError(f"{subject} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise KernelDistillError(f"unknown {fields_of} field(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
    return cls(**d)


# How the random networks' conv outputs may be normalised (:attr:`RandomFeatures.norm`).
RF_NORMS = ("none", "instance")


@dataclasses.dataclass(frozen=True)
class RandomFeatures:
    """Approximate the NNGP by the readout features of random finite networks (RFAD); see
    :mod:`kernel_distill.kernels.random_features`.

    Attributes:
      models: ``M``, random networks per kernel evaluation.
      width: ``W``, channels (or units) of each hidden layer of those networks.
      seed: the evaluation networks are drawn from ``PRNGKey(seed)``; KIP draws fresh ones every step.
      norm: ``"none"`` (the architecture as it is: the features estimate its exact NNGP) or ``"instance"``:
        each conv's output is normalised per image and channel over positions before its ReLU, as in the
        evaluation ConvNet (:class:`kernel_distill.finite.EvalConvNet`). That is a different kernel, the
        NNGP of the instance-normalised network, which has no closed form here: only random features
        compute it. Conv architectures only.
    """

    models: int = 8
    width: int = 128
    seed: int = 0
    norm: str = "none"

    def __post_init__(self):
        from kernel_distill.kernels.random_features import check_random_features

        check_random_features(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RandomFeatures":
        return _from_strict_dict(cls, d, "random_features", "random_features")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Which infinite network's kernel to compute.

    Attributes:
      architecture: a name in :data:`ARCHITECTURE_REGISTRY`: ``"fc"``, ``"convnet"`` (KIP ConvNet, with the
        prepended conv + ReLU) or ``"convnet3"`` (without).
      depth: hidden Dense+ReLU layers for ``fc``; conv+ReLU+pool blocks for the conv nets. ``None`` picks
        the architecture's default: 1 for ``fc``, 3 for the conv nets.
      W_std: weight standard deviation. KIP default ``sqrt(2)``.
      b_std: bias standard deviation. KIP default 0.1.
      parameterization: only ``"ntk"`` is implemented (the KIP default); ``"standard"`` is refused.
      random_features: ``None`` for the exact kernel; a :class:`RandomFeatures` approximates the NNGP by
        random finite networks of this architecture (CLI: ``--kernel convnet-rf``).
    """

    architecture: str = "fc"
    depth: int | None = None
    W_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    parameterization: str = "ntk"
    random_features: RandomFeatures | None = None

    def __post_init__(self):
        if isinstance(self.random_features, dict):
            object.__setattr__(self, "random_features", RandomFeatures.from_dict(self.random_features))
        if self.random_features is not None and not isinstance(self.random_features, RandomFeatures):
            raise KernelDistillError(f"random_features must be None or RandomFeatures, got {self.random_features!r}")
        if self.architecture not in ARCHITECTURE_REGISTRY:
            raise KernelDistillError(
                f"unknown kernel architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURE_REGISTRY)}")
        arch = ARCHITECTURE_REGISTRY[self.architecture]
        if self.depth is None:
            object.__setattr__(self, "depth", arch.default_depth)
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)) or self.depth < 0:
            raise KernelDistillError(f"kernel depth must be a non-negative integer, got {self.depth!r}")
        object.__setattr__(self, "depth", int(self.depth))
        if self.depth < arch.min_depth:
            raise KernelDistillError(
                f"the {self.architecture} kernel needs depth >= {arch.min_depth}, got {self.depth}")
        if self.depth > MAX_DEPTH:
            # Checked before anything is built: a file's metadata asking for 10^9 layers must fail in one line,
            # not trace a graph until the OS kills the process.
            raise KernelDistillError(f"kernel depth {self.depth} is beyond the {MAX_DEPTH} layers this package "
                                     f"supports")
        for name, low in (("W_std", 0.0), ("b_std", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise KernelDistillError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not (np.isfinite(self.W_std) and self.W_std > 0):
            raise KernelDistillError(f"W_std must be a positive number, got {self.W_std!r}")
        if not (np.isfinite(self.b_std) and self.b_std >= 0):
            raise KernelDistillError(f"b_std must be a non-negative number, got {self.b_std!r}")
        if self.parameterization != "ntk":
            raise KernelDistillError(
                f"parameterization {self.parameterization!r} is not implemented; only 'ntk' (the KIP default)")
        if self.random_features is not None and self.random_features.norm != "none" and not self.is_conv:
            raise KernelDistillError(f"random-feature norm {self.random_features.norm!r} normalises conv outputs: "
                                     f"the {self.architecture} architecture has none")

    @property
    def layers(self) -> tuple:
        """The architecture's layer tuple at this depth."""
        return ARCHITECTURE_REGISTRY[self.architecture].layers(self.depth)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        """The CLI name: the architecture, with ``-rf`` for the random-feature approximation."""
        return self.architecture + ("-rf" if self.random_features is not None else "")

    @property
    def description(self) -> str:
        """The name, with what it does not say: ``convnet3-rf (instance norm)``."""
        norm = self.random_features.norm if self.random_features is not None else "none"
        return self.name + (f" ({norm} norm)" if norm != "none" else "")

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        """Inverse of :meth:`to_dict`; unknown keys are refused (a misspelt key must not fall back to a default)."""
        return _from_strict_dict(cls, d, "a kernel spec", "kernel spec")

    @property
    def is_conv(self) -> bool:
        return any(isinstance(layer, Conv) for layer in self.layers)

    def min_spatial_size(self) -> int:
        """Smallest image height/width the network accepts: each 2x2 pool halves it (VALID)."""
        return 2 ** sum(isinstance(layer, AvgPool) for layer in self.layers)
