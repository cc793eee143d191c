"""What several workflows share: the kernel, compute and preprocessing parts of a request, and the steps
every workflow takes (check a count, resolve ``zoo:NAME``, own the output folder, build the kernel).

Standard library and numpy only at import time (see :mod:`kernel_distill.workflows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from typing import TYPE_CHECKING, Any, Callable, overload

import numpy as np

from kernel_distill.errors import KernelDistillError

if TYPE_CHECKING:  # the workflows import the library inside their functions (no JAX on import)
    from kernel_distill.distributed import Backend, BackendOptions
    from kernel_distill.io import DistilledSet
    from kernel_distill.kernels import KernelFn, KernelSpec, RandomFeatureKernelFn

DEFAULT_ZCA_REG = 0.1
Log = Callable[[str], None]  # where a workflow's messages go (print, or a notebook's logger)
OnRecord = Callable[[dict], None]  # called with the result record once it is written


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernel a request asks for (``--kernel``, ``--get``, ``--depth``, ...). ``None`` everywhere means
    "the default", or, for a command given a file or a run, the kernel recorded there."""

    kernel: str | None = None  # fc, convnet, convnet3, or one of them with -rf (random features)
    get: str | None = None  # ntk or nngp
    depth: int | None = None
    W_std: float | None = None
    b_std: float | None = None
    reg: float | None = None  # KRR regulariser relative to trace(K)/n
    rf_models: int | None = None
    rf_width: int | None = None
    rf_seed: int | None = None
    rf_norm: str | None = None

    def names_an_architecture(self) -> bool:
        """Whether any option that shapes the kernel itself was given (``get`` and ``reg`` do not)."""
        return any(v is not None for v in (self.kernel, self.depth, self.W_std, self.b_std, self.rf_models,
                                           self.rf_width, self.rf_seed, self.rf_norm))


@dataclasses.dataclass(frozen=True)
class Compute:
    """Where and how precisely kernels are computed (``--float64``, ``--memory-budget-mb``, ``--backend``...)."""

    float64: bool = False
    memory_budget_mb: float | None = None  # None: the device's default (kernels.default_memory_budget_mb)
    backend: str = "local"  # local or ray (docs/DISTRIBUTED.md)
    workers: int | None = None
    ray_address: str | None = None
    worker_retries: int = 3

    @property
    def dtype(self) -> type:
        return np.float64 if self.float64 else np.float32

    def backend_options(self) -> BackendOptions:
        """The backend asked for, checked (a bad ``--workers``, an address nobody answers) before any data is
        loaded."""
        from kernel_distill.distributed import BackendOptions

        return BackendOptions(self.backend, self.workers, self.ray_address, self.worker_retries)

    def open_backend(self) -> contextlib.AbstractContextManager[Backend | None]:
        """A context giving the backend: ``None`` for local (the library's in-process path, unchanged)."""
        from kernel_distill.distributed import open_backend

        options = self.backend_options()
        return contextlib.nullcontext() if options.backend == "local" else open_backend(options)

    def budget_mb(self) -> float:
        """The memory budget of one kernel block, in MiB: the one asked for, else the device's default."""
        from kernel_distill.kernels import default_memory_budget_mb

        if self.memory_budget_mb is None:
            return default_memory_budget_mb()
        if self.memory_budget_mb < 1:  # below a MiB a kernel tile holds nothing
            raise KernelDistillError(f"--memory-budget-mb must be at least 1 (MiB), got {self.memory_budget_mb:g}")
        return self.memory_budget_mb

    def enable_precision(self) -> None:
        """Switch JAX to float64 when asked: before any array is made, and for the whole process."""
        if self.float64:
            import jax

            jax.config.update("jax_enable_x64", True)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are preprocessed (``--zca``, ``--zca-reg``). ``zca_reg`` ``None``: not given, the default
    applies; a file that carries its own preprocessing then uses it silently (an explicit value is refused)."""

    zca: bool = False
    zca_reg: float | None = None

    @property
    def reg(self) -> float:
        return DEFAULT_ZCA_REG if self.zca_reg is None else self.zca_reg


def kernel_spec(choice: KernelChoice, fallback: dict | None = None) -> KernelSpec:
    """The :class:`~kernel_distill.kernels.KernelSpec` ``choice`` asks for; options not given fall back to
    ``fallback`` (a file's or a run's recorded kernel) when it names the same kernel."""
    from kernel_distill.kernels import KernelSpec, RandomFeatures

    fallback = fallback or {}
    fallback_rf = fallback.get("random_features")
    fallback_name = fallback.get("architecture", "fc") + ("-rf" if fallback_rf else "")
    name = choice.kernel or fallback_name
    random = name.endswith("-rf")
    architecture = name[:-3] if random else name
    same_architecture = fallback.get("architecture") == architecture
    kwargs: dict[str, Any] = dict(architecture=architecture)
    kwargs["depth"] = choice.depth if choice.depth is not None else (
        fallback.get("depth") if same_architecture else None)
    for option in ("W_std", "b_std"):
        value = getattr(choice, option)
        if value is None and same_architecture:
            value = fallback.get(option)
        if value is not None:
            kwargs[option] = value
    rf_options = dict(models=choice.rf_models, width=choice.rf_width, seed=choice.rf_seed, norm=choice.rf_norm)
    if random:
        base = dict(fallback_rf) if (fallback_rf and name == fallback_name) else {}
        base.update({k: v for k, v in rf_options.items() if v is not None})
        kwargs["random_features"] = RandomFeatures(**base)
    elif any(v is not None for v in rf_options.values()):
        raise KernelDistillError(f"--rf-models, --rf-width, --rf-seed and --rf-norm need a random-feature kernel "
                                 f"(--kernel {architecture}-rf), not {name}")
    return KernelSpec(**kwargs)


def default_get(choice: KernelChoice, spec: KernelSpec) -> str:
    """``--get``, else the kernel's natural one: NNGP for random features (they approximate only it), NTK."""
    return choice.get or ("nngp" if spec.random_features is not None else "ntk")


def regulariser(choice: KernelChoice, recorded: dict | None = None) -> float:
    """``--reg``, else the one recorded in ``recorded`` (a file's metadata), else KRR's default."""
    from kernel_distill.krr import DEFAULT_REG

    if choice.reg is not None:
        return choice.reg
    return (recorded or {}).get("reg", DEFAULT_REG)


def kernel_function(compute: Compute, spec: KernelSpec) -> KernelFn | RandomFeatureKernelFn:
    """The kernel function of ``spec``, its blocks bounded by the request's memory budget."""
    from kernel_distill.kernels import make_kernel_fn

    return make_kernel_fn(spec, memory_budget_bytes=int(compute.budget_mb() * 2**20))


def check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    """Refuse a count below 1 (``None`` too unless ``allow_none``), naming the option."""
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise KernelDistillError(f"{name} must be a positive integer, got {value}")


def distilled_path(text: str, data_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """A distilled-set argument as a file: ``zoo:NAME`` is the zoo's verified copy, anything else a path."""
    from kernel_distill import zoo

    return zoo.resolve(text, data_dir, progress=progress)


def refuse_preprocessing_options(preprocessing: Preprocessing, distilled: DistilledSet, source: str) -> None:
    """A file that carries its preprocessing is used in its own space: an explicit ``--zca-reg`` would be
    silently ignored, so it is refused (``--zca`` is checked by :func:`io.check_preprocessing_request`)."""
    if preprocessing.zca_reg is not None and distilled.preprocessor is not None:
        raise KernelDistillError(f"--zca-reg: {source} carries its own preprocessing, which is used as it is; "
                                 f"drop --zca-reg")


@overload
def output_folder(out: str | os.PathLike, command: str,
                  overwrite: bool = False) -> contextlib.AbstractContextManager[pathlib.Path]: ...
@overload
def output_folder(out: None, command: str, overwrite: bool = False) -> contextlib.AbstractContextManager[None]: ...


def output_folder(out: str | os.PathLike | None, command: str,
                  overwrite: bool = False) -> contextlib.AbstractContextManager[pathlib.Path | None]:
    """Create, test and lock the command's output folder before any computation; without one, nothing."""
    from kernel_distill.runs import claim_output_folder

    return claim_output_folder(out, command, overwrite=overwrite) if out is not None else contextlib.nullcontext()


def argv(command_line: tuple[str, ...] | None) -> list[str] | None:
    """A request's command line as the results schema takes it (``None``: this process's ``sys.argv``)."""
    return None if command_line is None else list(command_line)


def write_record(out: str | os.PathLike | None, record: dict, on_record: OnRecord | None = None) -> dict:
    """Write ``out/results.json`` when the run has a folder, then hand the record to ``on_record`` (the
    command line prints it for ``--json``); return it."""
    from kernel_distill.results import write_results

    if out is not None:
        write_results(pathlib.Path(out), record)
    if on_record is not None:
        on_record(record)
    return record
