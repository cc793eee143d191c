"""The KRR objective module: its loss against a numpy closed form, its VJP against ``jax.grad``, on any executor."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernel_distill import objective
from kernel_distill.distributed import LocalBackend
from kernel_distill.kernels import KernelSpec, make_kernel_fn
from kernel_distill.preprocess import centered_one_hot



def _numpy_predictions(k_ts, k_ss, y_s, reg):
    n = len(k_ss)
    return k_ts @ np.linalg.solve(k_ss + reg * np.trace(k_ss) / n * np.eye(n), y_s)


def test_losses_match_the_numpy_closed_form(x64, rng):
    """MSE ``0.5 mean((K_ts (K_ss + reg tr/n I)^-1 y_s - y_t)^2)`` and the Platt cross-entropy, and the
    cotangents of :func:`objective.loss_vjp` against central differences of the numpy loss."""
    a = rng.normal(size=(5, 5))
    k_ss, k_ts = a @ a.T + 0.1 * np.eye(5), rng.normal(size=(4, 5))
    y_s, classes = rng.normal(size=(5, 3)), np.array([0, 2, 1, 2])
    y_t = centered_one_hot(classes, 3)

    def numpy_mse(k_ts, k_ss, y_s):
        return 0.5 * np.mean((_numpy_predictions(k_ts, k_ss, y_s, 1e-2) - y_t) ** 2)

    def numpy_platt(log_scale):
        logits = np.exp(log_scale) * _numpy_predictions(k_ts, k_ss, y_s, 1e-2)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(log_probs[np.arange(4), classes])

    np.testing.assert_allclose(float(objective.kip_loss(k_ts, k_ss, y_s, y_t, 1e-2)), numpy_mse(k_ts, k_ss, y_s),
                               rtol=1e-12)
    np.testing.assert_allclose(float(objective.kip_loss(k_ts, k_ss, y_s, y_t, 1e-2, 0.4)), numpy_platt(0.4),
                               rtol=1e-12)
    loss, d_kts, d_kss, d_ys, d_scale = objective.loss_vjp(k_ts, k_ss, y_s, y_t, 1e-2)
    assert d_scale is None
    np.testing.assert_allclose(float(loss), numpy_mse(k_ts, k_ss, y_s), rtol=1e-12)
    eps = 1e-6
    # K_ss is symmetric: a perturbation of one pair (i, j), (j, i) moves the loss by G_ij + G_ji
    g_ss = d_kss + d_kss.T
    for (i, j), cotangent, which in (((1, 2), d_kts, 0), ((0, 3), g_ss, 1), ((2, 2), d_kss, 1), ((4, 1), d_ys, 2)):
        up, down = [k_ts.copy(), k_ss.copy(), y_s.copy()], [k_ts.copy(), k_ss.copy(), y_s.copy()]
        for a, sign in ((up, eps), (down, -eps)):
            a[which][i, j] += sign
            if which == 1 and i != j:
                a[which][j, i] += sign
        np.testing.assert_allclose(float(cotangent[i, j]), (numpy_mse(*up) - numpy_mse(*down)) / (2 * eps),
                                   rtol=1e-6)
    d_scale = objective.loss_vjp(k_ts, k_ss, y_s, y_t, 1e-2, 0.4)[4]
    np.testing.assert_allclose(float(d_scale), (numpy_platt(0.4 + eps) - numpy_platt(0.4 - eps)) / (2 * eps),
                               rtol=1e-6)


def test_vjp_through_kernel_blocks_equals_jax_grad(x64, rng):
    """A tiny FC NTK problem on the local backend, jitted and not: loss and all gradients as ``jax.grad`` of
    the whole loss, for both losses; the target rows are drawn by index from a larger set."""
    kernel_fn = make_kernel_fn(KernelSpec("fc", 1))
    x_s, y_s = rng.normal(size=(4, 6)), rng.normal(size=(4, 3))
    targets, idx = rng.normal(size=(9, 6)), np.array([7, 1, 4, 0, 5])
    y_t = centered_one_hot(np.arange(5) % 3, 3)

    def whole(xs, ys, scale):
        return objective.kip_loss(kernel_fn(targets[idx], xs), kernel_fn(xs, xs), ys, y_t, 1e-3, scale)

    backend = LocalBackend()
    for scale in (None, 0.3):
        argnums = (0, 1) if scale is None else (0, 1, 2)
        ref_loss, refs = jax.jit(jax.value_and_grad(whole, argnums=argnums))(x_s, y_s, scale)  # the reference: jitted
        eager = objective.loss_and_gradients(backend, kernel_fn, "ntk", 1e-3, x_s, y_s, targets, idx, y_t, scale)
        compiled = objective.compiled_loss_and_gradients(backend, kernel_fn, "ntk")(1e-3, x_s, y_s, targets, idx,
                                                                                     y_t, scale)
        for ours in (eager, compiled):
            assert len(ours) == len(refs) + 1
            np.testing.assert_allclose(float(ours[0]), float(ref_loss), rtol=1e-12)
            for got, ref in zip(ours[1:], refs):
                assert float(jnp.abs(got - ref).max()) <= 1e-10 * float(jnp.abs(ref).max())
    assert objective.compiled_loss_and_gradients(LocalBackend(), kernel_fn, "ntk") is \
        objective.compiled_loss_and_gradients(backend, kernel_fn, "ntk")  # equal executors share one compilation


@dataclasses.dataclass
class TwoShareLinearBlocks:
    """A block executor that is neither backend: the linear kernel ``K(a, b) = a b^T`` (flattened images),
    its blocks computed in two shares of target rows, their VJPs by ``jax.vjp`` and summed in numpy, as a
    remote executor would. It counts its calls and keeps no JAX state between them beyond ``residuals``."""

    forward_calls: int = 0
    backward_calls: int = 0

    def forward_blocks(self, kernel_fn, get, x_s, targets, target_idx):
        self.forward_calls += 1
        x_t = targets if target_idx is None else targets[np.asarray(target_idx)]
        flat_s, flat_t = x_s.reshape(len(x_s), -1), x_t.reshape(len(x_t), -1)
        half = len(flat_t) // 2
        k_ts = np.concatenate([np.asarray(flat_t[:half] @ flat_s.T), np.asarray(flat_t[half:] @ flat_s.T)])
        return jnp.asarray(k_ts), jnp.asarray(flat_s @ flat_s.T), (x_s, flat_t, half)

    def backward_blocks(self, residuals, d_kts, g_ss):
        self.backward_calls += 1
        x_s, flat_t, half = residuals
        flat_s = x_s.reshape(len(x_s), -1)
        parts = []
        for rows in (slice(0, half), slice(half, None)):
            _, vjp = jax.vjp(lambda s, t=flat_t[rows]: t @ s.T, flat_s)
            parts.append(np.asarray(vjp(d_kts[rows])[0]))
        _, vjp_ss = jax.vjp(lambda s: s @ flat_s.T, flat_s)  # through the first argument only
        total = parts[0] + parts[1] + np.asarray(vjp_ss(g_ss)[0])
        return jnp.asarray(total.reshape(x_s.shape))


def test_the_objective_runs_on_any_block_executor(x64, rng):
    """The objective asks an executor only for blocks forward and their summed VJPs: a linear-kernel executor
    of two shares gives ``jax.grad`` of the whole loss with that kernel, for both losses."""
    fake = TwoShareLinearBlocks()
    assert isinstance(fake, objective.BlockExecutor) and isinstance(LocalBackend(), objective.BlockExecutor)
    x_s, y_s = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3))
    targets, idx = rng.normal(size=(8, 3, 2)), np.array([6, 2, 3, 0, 7])
    y_t = centered_one_hot(np.array([0, 1, 2, 2, 1]), 3)

    def linear(a, b):
        return a.reshape(len(a), -1) @ b.reshape(len(b), -1).T

    def whole(xs, ys, scale):
        return objective.kip_loss(linear(targets[idx], xs), linear(xs, xs), ys, y_t, 1e-2, scale)

    for calls, scale in enumerate((None, -0.2), start=1):
        argnums = (0, 1) if scale is None else (0, 1, 2)
        ref_loss, refs = jax.jit(jax.value_and_grad(whole, argnums=argnums))(x_s, y_s, scale)  # the reference: jitted
        ours = objective.loss_and_gradients(fake, None, "ntk", 1e-2, x_s, y_s, targets, idx, y_t, scale)
        assert fake.forward_calls == fake.backward_calls == calls
        np.testing.assert_allclose(float(ours[0]), float(ref_loss), rtol=1e-12)
        for got, ref in zip(ours[1:], refs):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-9, atol=1e-12)
