"""kernel-distill: dataset distillation with infinite-width neural kernels (KIP, Label Solve) in JAX."""

__version__ = "0.1.0"

from kernel_distill.data import DATASETS, class_balanced_indices, load_dataset  # noqa: E402
from kernel_distill.errors import DataError, KernelDistillError  # noqa: E402
from kernel_distill.io import DistilledSet, load_distilled, save_distilled  # noqa: E402
from kernel_distill.kernels import KernelFn, KernelSpec, make_kernel_fn  # noqa: E402
from kernel_distill.krr import EvalResult, accuracy, evaluate, krr_loss, krr_predict  # noqa: E402
from kernel_distill.preprocess import Preprocessor, centered_one_hot, fit_preprocessor  # noqa: E402

__all__ = [
    "DATASETS", "DataError", "DistilledSet", "EvalResult", "KernelDistillError", "KernelFn", "KernelSpec",
    "Preprocessor", "accuracy", "centered_one_hot", "class_balanced_indices", "evaluate", "fit_preprocessor",
    "krr_loss", "krr_predict", "load_dataset", "load_distilled", "make_kernel_fn", "save_distilled",
    "__version__",
]
