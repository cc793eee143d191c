"""Write neural-tangents 0.6.5 reference kernels to tests/goldens/ (the independent oracle for our kernels).

neural-tangents 0.6.5 imports only with JAX <= 0.5.3 and needs TensorFlow, so it is never a dependency of
kernel-distill. Run this script in a virtualenv of its own::

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install "jax==0.5.3" "jaxlib==0.5.3" "neural-tangents==0.6.5"
    /tmp/ntvenv/bin/python tools/make_goldens.py

It builds each network with neural-tangents' own ``stax`` layers (the KIP architectures: FC and ConvNet in
NTK parameterization), evaluates NNGP and NTK in float64 on small random inputs, and saves one ``.npz``
per case with the inputs, the architecture and both kernels. The script does not import kernel_distill.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "goldens"


def fc_network(depth, W_std, b_std):
    layers = [stax.Flatten()]
    for _ in range(depth):
        layers += [stax.Dense(1, W_std=W_std, b_std=b_std, parameterization="ntk"), stax.Relu()]
    layers += [stax.Dense(1, W_std=W_std, b_std=b_std, parameterization="ntk")]
    return stax.serial(*layers)


def conv_network(depth, W_std, b_std, prepend_conv):
    def conv():
        return stax.Conv(1, (3, 3), strides=(1, 1), padding="SAME", W_std=W_std, b_std=b_std,
                         parameterization="ntk")

    layers = [conv(), stax.Relu()] if prepend_conv else []
    for _ in range(depth):
        layers += [conv(), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2), padding="VALID")]
    layers += [stax.Flatten(), stax.Dense(1, W_std=W_std, b_std=b_std, parameterization="ntk")]
    return stax.serial(*layers)


CASES = [
    # name, architecture, depth, W_std, b_std, x1 shape, n2
    ("fc_depth1", "fc", 1, 2**0.5, 0.1, (4, 7, 5, 2), 5),
    ("fc_depth3", "fc", 3, 2**0.5, 0.1, (4, 7, 5, 2), 5),
    ("fc_depth2_w1.3_b0.4", "fc", 2, 1.3, 0.4, (3, 20), 4),
    ("fc_depth4_b0", "fc", 4, 2**0.5, 0.0, (3, 12), 4),
    ("convnet_depth3_8x8x3", "convnet", 3, 2**0.5, 0.1, (3, 8, 8, 3), 4),
    ("convnet_depth3_10x10x1", "convnet", 3, 2**0.5, 0.1, (3, 10, 10, 1), 4),
    ("convnet3_depth3_12x12x2", "convnet3", 3, 2**0.5, 0.1, (3, 12, 12, 2), 4),
    ("convnet3_depth2_w1.2_b0.3", "convnet3", 2, 1.2, 0.3, (3, 9, 7, 2), 3),
    ("convnet_depth3_28x28x1", "convnet", 3, 2**0.5, 0.1, (2, 28, 28, 1), 3),
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261125)
    for name, arch, depth, W_std, b_std, shape1, n2 in CASES:
        x1 = rng.standard_normal(shape1)
        x2 = rng.standard_normal((n2, *shape1[1:]))
        # A shared row puts the exact diagonal K(x, x) (the arccos boundary) into the cross matrix too.
        x2[0] = x1[1]
        if arch == "fc":
            _, _, kernel_fn = fc_network(depth, W_std, b_std)
        else:
            _, _, kernel_fn = conv_network(depth, W_std, b_std, prepend_conv=(arch == "convnet"))
        kernel_fn = jax.jit(kernel_fn, static_argnames="get")
        k12 = kernel_fn(x1, x2, get=("nngp", "ntk"))
        k11 = kernel_fn(x1, x1, get=("nngp", "ntk"))
        spec = dict(architecture=arch, depth=depth, W_std=W_std, b_std=b_std, parameterization="ntk")
        np.savez_compressed(
            OUT / f"{name}.npz",
            x1=x1, x2=x2,
            nngp_12=np.asarray(k12.nngp), ntk_12=np.asarray(k12.ntk),
            nngp_11=np.asarray(k11.nngp), ntk_11=np.asarray(k11.ntk),
            spec=json.dumps(spec),
            source=f"neural-tangents {nt.__version__} on jax {jax.__version__}, float64",
        )
        print(f"{name}: nngp_12[0,0]={float(k12.nngp[0, 0]):.6g} ntk_12[0,0]={float(k12.ntk[0, 0]):.6g}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
