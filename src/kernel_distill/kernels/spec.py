"""Architectures as tuples of layers, and the :class:`KernelSpec` that names one.

One definition serves every consumer: the exact infinite-width kernel (:mod:`kernel_distill.kernels.exact`),
the finite flax networks (:class:`kernel_distill.kernels.networks.LayerNet`), the random-feature networks and
the Monte-Carlo tests all walk the same tuple of layer objects, and each layer carries its own rules
(:mod:`kernel_distill.kernels.layers`, where the layer classes live; they are importable from here too). A new
architecture is one function in :data:`ARCHITECTURE_REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels.layers import (  # noqa: F401  (the layer classes' home is layers; spec re-exports)
    AvgPool, Conv, Dense, Flatten, InstanceNorm, Layer, Relu, min_spatial_size, needs_images, serial,
    validate_layers)


MAX_DEPTH = 100


def fc_layers(depth: int) -> tuple:
    """``depth`` hidden Dense + ReLU layers, then a Dense readout."""
    return serial(Flatten(), *(Dense(), Relu()) * depth, Dense())


def convnet_layers(depth: int) -> tuple:
    """The KIP ConvNet: 3x3 conv + ReLU, then ``depth`` blocks of (conv, ReLU, 2x2 average pool), readout."""
    return serial(Conv(), Relu(), *convnet3_layers(depth))


def convnet3_layers(depth: int) -> tuple:
    """The KIP ConvNet without the first conv + ReLU: ``depth`` blocks of (conv, ReLU, pool), readout."""
    return serial(*(Conv(), Relu(), AvgPool()) * depth, Flatten(), Dense())


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
    """Add an architecture: ``layers(depth)`` must return a tuple of layer objects
    (:mod:`kernel_distill.kernels.layers`), e.g. built by :func:`serial`.

    The exact kernel (:class:`KernelSpec` ``(name, depth)``), the finite network
    (:class:`kernel_distill.kernels.networks.LayerNet`) and the random features then all accept it.
    """
    if name in ARCHITECTURE_REGISTRY:
        raise KernelDistillError(f"architecture {name!r} is already registered")
    if not isinstance(layers(default_depth), tuple):
        raise KernelDistillError("layers(depth) must return a tuple")
    validate_layers(layers(default_depth))
    ARCHITECTURE_REGISTRY[name] = Architecture(layers, default_depth, min_depth, description)


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


# How the random networks' conv outputs may be normalised (:attr:`RandomFeatures.norm`): the layer put after
# each conv of the random networks (kernel_distill.kernels.random_features.feature_layers), or None.
RF_NORM_LAYERS = {"none": None, "instance": InstanceNorm}
RF_NORMS = tuple(RF_NORM_LAYERS)

MAX_RANDOM_FEATURES = dict(models=4096, width=16384)


def check_random_features(rf: RandomFeatures) -> None:
    """Validate a :class:`RandomFeatures` (raises one-line errors)."""
    for name in ("models", "width"):
        value = getattr(rf, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise KernelDistillError(f"random features: {name} must be a positive integer, got {value!r}")
        if value > MAX_RANDOM_FEATURES[name]:
            # A file's metadata is read before anything is allocated: an absurd size must fail here, in one
            # line, not as an out-of-memory kill minutes later.
            raise KernelDistillError(f"random features: {name} {value} is beyond the {MAX_RANDOM_FEATURES[name]} "
                                     f"this package supports")
    if isinstance(rf.seed, bool) or not isinstance(rf.seed, (int, np.integer)) or rf.seed < 0:
        raise KernelDistillError(f"random features: seed must be a non-negative integer, got {rf.seed!r}")
    if rf.norm not in RF_NORMS:
        raise KernelDistillError(f"random features: norm must be one of {', '.join(RF_NORMS)}, got {rf.norm!r}")


@dataclasses.dataclass(frozen=True)
class RandomFeatures:
    """Approximate the NNGP by the readout features of random finite networks (RFAD); see
    :mod:`kernel_distill.kernels.random_features`.

    Attributes:
      models: ``M``, random networks per kernel evaluation.
      width: ``W``, channels (or units) of each hidden layer of those networks.
      seed: the evaluation networks are drawn from ``PRNGKey(seed)``; KIP draws fresh ones every step.
      norm: ``"none"`` (the architecture as it is: the features estimate its exact NNGP) or ``"instance"``:
        each conv's output is normalised per image and channel over positions before its ReLU (an
        :class:`InstanceNorm` layer after each conv), as in the evaluation ConvNet
        (:class:`kernel_distill.finite.EvalConvNet`). That is a different kernel, the
        NNGP of the instance-normalised network, which has no closed form here: only random features
        compute it. Conv architectures only.
    """

    models: int = 8
    width: int = 128
    seed: int = 0
    norm: str = "none"

    def __post_init__(self):
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
        assert self.depth is not None  # __post_init__ fills in the default depth
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
        """Whether the network takes NHWC images (it convolves or pools)."""
        return needs_images(self.layers)

    def min_spatial_size(self) -> int:
        """Smallest image height/width the network accepts: each 2x2 pool halves it (VALID)."""
        return min_spatial_size(self.layers)
