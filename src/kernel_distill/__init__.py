"""kernel-distill: dataset distillation with infinite-width neural kernels (KIP, Label Solve) in JAX."""

__version__ = "0.1.0"

import importlib
from typing import Any

from kernel_distill._xla_workarounds import avoid_known_xla_cpu_crashes

avoid_known_xla_cpu_crashes()  # before any module of the package starts JAX's CPU backend

# The public names, each loaded from its module on first use (PEP 562): importing the package, or any
# of its light modules (the command line's parser, the zoo index, the results schema), loads no JAX.
_EXPORTS = {
    "DATASETS": "data", "class_balanced_indices": "data", "load_dataset": "data",
    "DataError": "errors", "KernelDistillError": "errors",
    "DistilledSet": "io", "load_distilled": "io", "save_distilled": "io",
    "KernelFn": "kernels", "KernelSpec": "kernels", "make_kernel_fn": "kernels",
    "EvalResult": "krr", "accuracy": "krr", "evaluate": "krr", "krr_loss": "krr", "krr_predict": "krr",
    "Preprocessor": "preprocess", "centered_one_hot": "preprocess", "fit_preprocessor": "preprocess",
}

__all__ = [
    "DATASETS", "DataError", "DistilledSet", "EvalResult", "KernelDistillError", "KernelFn", "KernelSpec",
    "Preprocessor", "accuracy", "centered_one_hot", "class_balanced_indices", "evaluate", "fit_preprocessor",
    "krr_loss", "krr_predict", "load_dataset", "load_distilled", "make_kernel_fn", "save_distilled",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"kernel_distill.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'kernel_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
