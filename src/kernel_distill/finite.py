"""Finite-width networks (flax + optax) trained on a distilled set, scored on the real test set.

Models:

* :class:`LayerNet` (:mod:`kernel_distill.kernels.networks`): the finite network of a kernel architecture
  (``convnet``, ``convnet3``, ``fc``), composed from the same layer tuple as the exact kernel, each layer's
  own finite rule (:mod:`kernel_distill.kernels.layers`); ``width`` channels or units; standard or NTK
  parameterization with the kernel's ``W_std``/``b_std``.
* :class:`EvalConvNet`: the field's standard evaluation network (DC, DSA, MTT, ...): ``depth`` blocks of
  (3x3 conv with bias, instance normalisation, ReLU, 2x2 average pool) of width 128, then a dense layer.

Training: full-batch (distilled sets are small) SGD with momentum 0.9 and a cosine schedule, or Adam;
L2 weight decay coupled to the gradient (``weight_decay * params`` is added to the gradient before
momentum or Adam, like PyTorch's ``weight_decay``; not AdamW's decoupled decay); MSE on the (possibly
learned, dense) labels or cross-entropy on their argmax. Optional augmentation of each batch: random
translations of up to 4 pixels and horizontal flips for natural images, or DSA's (colour, crop, cutout,
flip, scale, rotation), with which the field evaluates distilled sets. :func:`train` can also score a
validation split, which :func:`kernel_distill.experiments.tune_transfer` uses to choose the protocol
without the test set.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernel_distill.errors import KernelDistillError
from kernel_distill.kernels import spec as spec_layers
from kernel_distill.kernels.networks import LayerNet  # noqa: F401  (defined with the layers' rules; used here)

if TYPE_CHECKING:
    from jax.typing import ArrayLike

MODELS = ("convnet", "convnet3", "fc", "evalnet")
_DEFAULT_WIDTHS = {"convnet": 128, "convnet3": 128, "fc": 1024}
AUGMENTATIONS = ("none", "crop", "flip-crop", "dsa")
MAX_SHIFT = 4  # pixels: the "pad 4 and crop" translation of CIFAR training (DSA's crop is similar)
# Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), the parameters of its reference code
# (ParamDiffAug), which MTT, FRePo and later dataset-distillation papers evaluate their sets with.
DSA_SCALE = 1.2  # each axis scaled by a factor in [1/1.2, 1.2]
DSA_ROTATE_DEGREES = 15.0
DSA_CROP_RATIO = 0.125  # translation of up to 0.125 of the side (4 pixels at 28 and 32)
DSA_CUTOUT_RATIO = 0.5  # a zeroed rectangle of half the height and half the width
DSA_BRIGHTNESS, DSA_SATURATION, DSA_CONTRAST = 1.0, 2.0, 0.5


def _translate(images, key, max_shift: int):
    """Each image shifted by an independent integer offset in ``[-max_shift, max_shift]`` per axis, 0 fill."""
    n, h, w, c = images.shape
    shifts = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, shifts)


def _mirror(images, key):
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def affine_resample(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Resample ``(n, H, W, C)`` images through per-image 2x2 ``matrices`` ``(n, 2, 2)``; same shape.

    Output pixel at normalised coordinates ``p = (x, y)`` in ``[-1, 1]^2`` (corner pixel centres at +-1)
    reads the input at ``matrix @ p``, bilinearly, 0 outside: PyTorch's ``affine_grid`` + ``grid_sample``
    with ``align_corners=True``, as DSA's scale and rotation use them.
    """
    n, h, w, c = images.shape
    ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    grid = jnp.stack([xs.ravel(), ys.ravel()]).astype(images.dtype)  # (2, H*W), rows x then y

    def one(image, matrix):
        source = matrix @ grid
        coords = [(source[1] + 1) / 2 * (h - 1), (source[0] + 1) / 2 * (w - 1)]  # row, column

        def channel(plane):
            return jax.scipy.ndimage.map_coordinates(plane, coords, order=1, mode="constant", cval=0.0)

        return jax.vmap(channel, in_axes=2, out_axes=1)(image).reshape(h, w, c)

    return jax.vmap(one)(images, matrices.astype(images.dtype))


def _dsa_color(images, key):
    n = images.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    out = images + (jax.random.uniform(k1, (n, 1, 1, 1)) - 0.5) * DSA_BRIGHTNESS
    mean = out.mean(axis=3, keepdims=True)
    out = (out - mean) * (jax.random.uniform(k2, (n, 1, 1, 1)) * DSA_SATURATION) + mean
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    return (out - mean) * (jax.random.uniform(k3, (n, 1, 1, 1)) + DSA_CONTRAST) + mean


def _dsa_crop(images, key):
    return _translate(images, key, int(images.shape[1] * DSA_CROP_RATIO + 0.5))


def _dsa_cutout(images, key):
    n, h, w, _ = images.shape
    height, width = int(h * DSA_CUTOUT_RATIO + 0.5), int(w * DSA_CUTOUT_RATIO + 0.5)
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (n, 1, 1, 1), 0, h + (1 - height % 2)) - height // 2
    left = jax.random.randint(kx, (n, 1, 1, 1), 0, w + (1 - width % 2)) - width // 2
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return jnp.where(inside, jnp.zeros_like(images), images)


def _dsa_scale(images, key):
    n = images.shape[0]
    factors = jax.random.uniform(key, (n, 2)) * (DSA_SCALE - 1 / DSA_SCALE) + 1 / DSA_SCALE
    return affine_resample(images, jax.vmap(jnp.diag)(factors))


def _dsa_rotate(images, key):
    angle = (jax.random.uniform(key, (images.shape[0],)) - 0.5) * 2 * DSA_ROTATE_DEGREES / 180 * math.pi
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return affine_resample(images, jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2))


# DSA's evaluation mode ("S"): one of these per batch, chosen at random, with per-image parameters
DSA_TRANSFORMS = {"color": _dsa_color, "crop": _dsa_crop, "cutout": _dsa_cutout, "flip": _mirror,
                  "scale": _dsa_scale, "rotate": _dsa_rotate}


def augment_batch(images: jax.Array, key: jax.Array, kind: str) -> jax.Array:
    """Randomly augment a batch ``(n, H, W, C)`` float (preprocessed) images; same shape and dtype.

    ``"none"``: unchanged. ``"crop"``: each image translated by an independent integer offset in
    ``[-4, 4]`` per axis, the uncovered border filled with 0 (the preprocessed mean). ``"flip-crop"``: also
    mirrored left-right with probability 1/2 (for natural images; not for digits). ``"dsa"``: DSA's
    evaluation augmentation: per batch one of :data:`DSA_TRANSFORMS` (colour: brightness, saturation and
    contrast; crop; cutout; flip; scale; rotation), each image with its own parameters.
    """
    if kind == "none":
        return images
    if kind == "dsa":
        choice_key, parameter_key = jax.random.split(key)
        branches = [lambda x, fn=fn: fn(x, parameter_key).astype(x.dtype) for fn in DSA_TRANSFORMS.values()]
        return jax.lax.switch(jax.random.randint(choice_key, (), 0, len(branches)), branches, images)
    shift_key, flip_key = jax.random.split(key)
    out = _translate(images, shift_key, MAX_SHIFT)
    if kind == "flip-crop":
        out = _mirror(out, flip_key)
    return out


def _avg_pool(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class EvalConvNet(nn.Module):
    """The standard dataset-distillation evaluation ConvNet (width 128, depth 3, instance norm, avg pool).

    ``(n, H, W, C) -> (n, num_classes)``. Parameters: per block ``(9 c_in + 1) w + 2 w`` (conv with bias,
    instance-norm scale and shift), then ``(w * H' * W' + 1) * num_classes`` with ``H' = H // 2**depth``.
    """

    num_classes: int
    width: int = 128
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.Conv(self.width, (3, 3), padding="SAME")(x)
            x = nn.GroupNorm(num_groups=self.width, epsilon=1e-5)(x)  # one group per channel: instance norm
            x = _avg_pool(nn.relu(x))
        return nn.Dense(self.num_classes)(x.reshape(len(x), -1))


def build_model(name: str, num_classes: int, width: int | None = None, depth: int | None = None,
                parameterization: str = "standard") -> nn.Module:
    if name not in MODELS:
        raise KernelDistillError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if parameterization not in ("standard", "ntk"):
        raise KernelDistillError(f"parameterization must be 'standard' or 'ntk', got {parameterization!r}")
    if name in spec_layers.ARCHITECTURE_REGISTRY:
        spec = spec_layers.KernelSpec(name, depth)
        return LayerNet(spec.layers, num_classes, width or _DEFAULT_WIDTHS[name], parameterization, spec.W_std,
                        spec.b_std)
    return EvalConvNet(num_classes, width or 128, depth or 3)


def count_parameters(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a finite network is trained on a distilled set."""

    steps: int = 1000
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, cosine schedule) or "adam"
    # 0.05 with the class-averaged MSE: 0.01 left 1000 steps undertrained (Fashion-MNIST 10/class, FC 1024:
    # 41.7% vs 59.9%), and summing the MSE over classes at 0.01 diverged on the same data.
    learning_rate: float = 0.05
    weight_decay: float = 5e-4
    loss: str = "mse"  # "mse" on the labels, or "ce" on their argmax
    # MSE targets are label_scale * labels (RFAD's finite-network protocol used 2-16): a larger margin to fit
    # without changing which class a label names. Cross-entropy reads only the argmax, so it keeps 1.
    label_scale: float = 1.0
    batch_size: int = 256
    eval_every: int = 100
    augment: str = "none"  # see AUGMENTATIONS and augment_batch

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise KernelDistillError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise KernelDistillError(f"--optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.loss not in ("mse", "ce"):
            raise KernelDistillError(f"--loss must be 'mse' or 'ce', got {self.loss!r}")
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise KernelDistillError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise KernelDistillError(f"--lr must be positive, got {self.learning_rate}")
        if not (self.label_scale > 0 and math.isfinite(self.label_scale)):
            raise KernelDistillError(f"--label-scale must be positive, got {self.label_scale}")
        if self.loss == "ce" and self.label_scale != 1.0:
            raise KernelDistillError("--label-scale applies to the mse loss; --loss ce reads only the labels' argmax")


def default_learning_rate(model_name: str) -> float:
    """The SGD learning rate ``kernel-distill transfer`` uses for a model when ``--lr`` is not given."""
    # Measured (docs/BENCHMARKS.md): the un-normalised 128-wide KIP ConvNet diverged or stalled at 0.05 on
    # MNIST 1/class sets and trained at 0.01; fc and the instance-normalised evalnet do well at 0.05.
    return 0.01 if model_name in ("convnet", "convnet3") else TrainConfig.learning_rate


def _optimizer(config: TrainConfig):
    if config.optimizer == "sgd":
        schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
        base = optax.sgd(schedule, momentum=0.9)
    else:
        schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
        base = optax.adam(schedule)
    # Coupled L2: the decay term joins the gradient before the optimiser (not decoupled, as in AdamW).
    return optax.chain(optax.add_decayed_weights(config.weight_decay), base)


def _loss_fn(logits, labels, kind: str, label_scale: float = 1.0):
    if kind == "mse":
        # The mean over classes too (as in the KRR loss): summing over classes multiplies the loss's top
        # curvature by C, and a 1024-wide standard-parameterized net then diverged at lr 0.01 with momentum.
        return 0.5 * jnp.mean((logits - label_scale * labels) ** 2)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(labels, axis=-1)))


def accuracy_on(model: nn.Module, params: Any, x_test: np.ndarray | jax.Array, y_test: np.ndarray | jax.Array,
                batch_size: int = 1000) -> float:
    """Accuracy of ``argmax(model(x))`` on ``(x_test, y_test)``, in batches."""
    apply = jax.jit(model.apply)
    correct = 0
    for i in range(0, len(x_test), batch_size):
        logits = apply(params, jnp.asarray(x_test[i:i + batch_size]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y_test[i:i + batch_size])))
    return correct / len(x_test)


# y_test, y_val: arrays where x_test, x_val are (else None); Any, as mypy cannot tie their None to the x's
def train(model: nn.Module, x_train: ArrayLike, y_train: ArrayLike, x_test: np.ndarray | jax.Array | None,
          y_test: Any, config: TrainConfig, key: jax.Array, progress: bool = True,
          description: str = "train", x_val: np.ndarray | jax.Array | None = None, y_val: Any = None) -> dict:
    """Train ``model`` on ``(x_train, y_train)`` (float labels ``(n, C)``) and score it on the test set.

    Returns ``dict(test_accuracy, curve=[(step, accuracy), ...], seconds, eval_seconds, num_parameters)``:
    ``seconds`` is the whole wall time (compilation and evaluations included), ``eval_seconds`` the part of
    it spent scoring. With a validation split ``(x_val, y_val)`` it also returns ``val_accuracy`` and
    ``val_curve``; ``x_test`` may then be None (tuning runs that must not look at the test set), and
    ``test_accuracy`` and ``curve`` are None and empty.
    """
    from tqdm.auto import tqdm

    x_train, y_train = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.float32)
    init_key, key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    batch = min(config.batch_size, len(x_train))

    @jax.jit
    def step(params, opt_state, key):
        key, sub = jax.random.split(key)
        idx = jax.random.permutation(sub, len(x_train))[:batch]

        inputs = x_train[idx]
        if config.augment != "none":  # no extra split otherwise: runs without augmentation keep their stream
            key, aug_key = jax.random.split(key)
            inputs = augment_batch(inputs, aug_key, config.augment)

        def loss(p):
            return _loss_fn(model.apply(p, inputs), y_train[idx], config.loss, config.label_scale)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    start = time.perf_counter()
    eval_seconds = 0.0
    curve, val_curve = [], []
    in_flight = None
    with tqdm(total=config.steps, desc=description, disable=not progress, leave=False, unit="step") as bar:
        for i in range(1, config.steps + 1):
            params, opt_state, key, value = step(params, opt_state, key)
            # Dispatch is asynchronous: unchecked, the loop can queue every step up to the next evaluation, and
            # Ctrl-C or SIGTERM then waits for the whole queue at exit. One step in flight keeps the device busy.
            if in_flight is not None:
                in_flight.block_until_ready()
            in_flight = value
            if i % config.eval_every == 0 or i == config.steps:
                value = float(value)
                if not math.isfinite(value):
                    raise KernelDistillError(f"training loss became {value} at step {i}; lower --lr")
                eval_start = time.perf_counter()
                shown = {}
                if x_val is not None:
                    val_curve.append((i, accuracy_on(model, params, x_val, y_val)))
                    shown["val"] = f"{100 * val_curve[-1][1]:.2f}%"
                if x_test is not None:
                    curve.append((i, accuracy_on(model, params, x_test, y_test)))
                    shown["acc"] = f"{100 * curve[-1][1]:.2f}%"
                eval_seconds += time.perf_counter() - eval_start
                bar.set_postfix(loss=f"{value:.3g}", **shown, refresh=False)
            bar.update(1)
    result = dict(test_accuracy=curve[-1][1] if curve else None, curve=curve, seconds=time.perf_counter() - start,
                  eval_seconds=eval_seconds, num_parameters=count_parameters(params))
    if x_val is not None:
        result.update(val_accuracy=val_curve[-1][1], val_curve=val_curve)
    return result


def train_seeds(model_fn: Callable[[], nn.Module], x_train: ArrayLike, y_train: ArrayLike,
                x_test: np.ndarray | jax.Array | None, y_test: np.ndarray | jax.Array | None, config: TrainConfig,
                seeds: Sequence[int], progress: bool = True, x_val: np.ndarray | jax.Array | None = None,
                y_val: np.ndarray | jax.Array | None = None) -> dict:
    """:func:`train` once per seed. Returns per-seed results and the mean and std of test accuracy."""
    runs = [train(model_fn(), x_train, y_train, x_test, y_test, config, jax.random.PRNGKey(s), progress,
                  description=f"seed {s}", x_val=x_val, y_val=y_val) for s in seeds]
    acc = np.array([r["test_accuracy"] for r in runs])
    return dict(runs=runs, mean=float(acc.mean()), std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0)
