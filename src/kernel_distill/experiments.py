"""The work behind the commands that produce results: evaluate a file, natural baselines, Label Solve on a
dataset, transfer to finite networks.

Each function takes plain values (no ``argparse`` namespace, no output folder) and returns a result dict whose
``metrics`` go into ``results.json`` (see :mod:`kernel_distill.results`). The commands' workflows
(:mod:`kernel_distill.workflows`) check a request, own the run folder, call these and write the record;
notebooks, benchmarks and tools call the same functions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from kernel_distill.data import (PreparedData, dataset_info, limit_test, load_dataset, natural_subset,
                                 validation_split)
from kernel_distill.errors import KernelDistillError
from kernel_distill.io import DistilledSet, check_preprocessing_request, dataset_of
from kernel_distill.krr import evaluate, evaluate_label_sets
from kernel_distill.preprocess import Preprocessor, centered_one_hot, fit_preprocessor
from kernel_distill.checksums import split_checksum

if TYPE_CHECKING:
    from kernel_distill.distributed import Backend
    from kernel_distill.finite import TrainConfig
    from kernel_distill.label_solve import NormalEquations

DataDir = str | os.PathLike | None  # where datasets are found (kernel_distill.data.resolve_data_dir)
KernelFunction = Callable[..., Any]  # kernel_fn(x1, x2=None, get=...) -> (n1, n2), e.g. a kernels.KernelFn


def load_test_split(dataset: str, data_dir: DataDir = None, test_limit: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The test split of ``dataset``, optionally limited to ``test_limit`` images (:func:`limit_test`):
    ``(x uint8, y int)``."""
    x_test, y_test = load_dataset(dataset, "test", data_dir, progress=progress)
    if test_limit:
        x_test, y_test = limit_test(x_test, y_test, test_limit)
    return x_test, y_test


def _load_split(dataset: str, split: str, data_dir: DataDir, progress: bool, checksums: dict[str, str],
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split as loaded, its checksum recorded in ``checksums`` (of the whole split), then limited to its first
    ``limit`` images (:func:`limit_test`) if given."""
    x, y = load_dataset(dataset, split, data_dir, progress=progress)
    checksums[split] = split_checksum(x, y)
    if limit:
        x, y = limit_test(x, y, limit)
    return x, y


def preprocessing_for(distilled: DistilledSet, source: str, dataset: str | None, data_dir: DataDir = None,
                      zca: bool = False, zca_reg: float = 0.1, progress: bool = True, log: Callable = print,
                      x_train: np.ndarray | None = None) -> Preprocessor:
    """Check a loaded distilled set against ``dataset``; return the preprocessing that maps its test images.

    The file's own preprocessing is used when it has one (a contradicting ``zca`` is refused), and a file
    made on another dataset is refused (:func:`kernel_distill.io.dataset_of`).

    A file without preprocessing (a released KIP file) gets it fitted on the training set (``zca`` and
    ``zca_reg`` say how): ``x_train`` (uint8 ``(n, H, W, C)``, the whole training split) when the caller
    has it loaded already, else read from ``data_dir``. ``source`` names the file in messages.
    """
    dataset = dataset_of(distilled, source, dataset)  # a set made on another dataset is refused
    check_preprocessing_request(distilled, source, zca)
    info = dataset_info(dataset)
    if distilled.num_classes != info.num_classes:
        raise KernelDistillError(f"{source} has {distilled.num_classes} label columns, {dataset} has "
                                 f"{info.num_classes} classes")
    if distilled.images.shape[1:] != info.image_shape:
        raise KernelDistillError(f"{source} holds images of shape {distilled.images.shape[1:]}, "
                                 f"{dataset} images are {info.image_shape}")
    preprocessor = distilled.preprocessor
    if preprocessor is None:
        # A released KIP file: its images live in KIP's space, which we rebuild from the training set.
        if x_train is None:
            x_train, _ = load_dataset(dataset, "train", data_dir, progress=progress)
        preprocessor = fit_preprocessor(x_train, zca=zca, zca_reg=zca_reg)
        log(f"{source} carries no preprocessing; fitted "
            f"{'standardisation + ZCA' if zca else 'standardisation'} on the {dataset} training set")
    return preprocessor


def evaluate_distilled(distilled: DistilledSet, preprocessor: Preprocessor, x_test: np.ndarray, y_test: np.ndarray,
                       kernel_fn: KernelFunction, reg: float, get: str, dtype: npt.DTypeLike = np.float32,
                       progress: bool = True, backend: Backend | None = None) -> dict:
    """KRR test accuracy of a distilled set (kernels on ``backend``, default here). Returns
    ``dict(metrics, seconds)``."""
    start = time.perf_counter()
    result = evaluate(kernel_fn, distilled.images.astype(dtype), distilled.labels.astype(dtype),
                      preprocessor.apply(x_test).astype(dtype), y_test, reg=reg, get=get, progress=progress,
                      backend=backend)
    seconds = time.perf_counter() - start
    metrics = dict(test_accuracy=result.accuracy, test_loss=result.mse_loss, num_test=result.num_test,
                   support_size=len(distilled.images))
    return dict(metrics=metrics, seconds=seconds)


def natural_baseline(dataset: str, per_class: int, seeds: int, kernel_fn: KernelFunction, reg: float, get: str,
                     data_dir: DataDir = None, zca: bool = False, zca_reg: float = 0.1, test_limit: int | None = None,
                     dtype: npt.DTypeLike = np.float32, progress: bool = True, log: Callable = print,
                     backend: Backend | None = None) -> dict:
    """KRR test accuracy of random class-balanced natural subsets (seeds ``0..seeds-1``).

    Returns ``dict(metrics, first_subset, checksums)``: accuracies as fractions in ``metrics``, and the seed-0 subset as
    a :class:`DistilledSet` (metadata left to the caller).
    """
    info = dataset_info(dataset)
    checksums: dict[str, str] = {}
    x_train, y_train = _load_split(dataset, "train", data_dir, progress, checksums)
    x_test, y_test = _load_split(dataset, "test", data_dir, progress, checksums, test_limit)
    preprocessor = fit_preprocessor(x_train, zca=zca, zca_reg=zca_reg)
    z_test = preprocessor.apply(x_test).astype(dtype)
    accuracies, first = [], None
    for seed in range(seeds):
        xs, ys = natural_subset(x_train, y_train, per_class, info.num_classes, seed)
        zs, labels = preprocessor.apply(xs), centered_one_hot(ys, info.num_classes)
        result = evaluate(kernel_fn, zs.astype(dtype), labels.astype(dtype), z_test, y_test, reg=reg, get=get,
                          progress=progress, description=f"seed {seed}", backend=backend)
        accuracies.append(result.accuracy)
        log(f"seed {seed}: {100 * result.accuracy:.2f}%")
        if seed == 0:
            first = DistilledSet(zs, labels, preprocessor)
    acc = np.asarray(accuracies)
    metrics = dict(test_accuracy=float(acc.mean()), test_accuracy_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                   test_accuracies=acc.tolist(), num_test=len(y_test), support_size=per_class * info.num_classes)
    return dict(metrics=metrics, first_subset=first, checksums=checksums)


def label_solve_on(data: PreparedData, kernel_fn: KernelFunction, x_support: np.ndarray, original_labels: np.ndarray,
                   reg: float, ls_reg: float, get: str, train_limit: int | None = None, block_size: int = 5000,
                   dtype: npt.DTypeLike = np.float32, progress: bool = True, backend: Backend | None = None, *,
                   chunk_blocks: int | None = None, start: NormalEquations | None = None,
                   on_chunk: Callable[[NormalEquations], None] | None = None) -> dict:
    """Solve the labels of ``x_support`` over the training set of ``data`` and score both label sets
    (kernels on ``backend``, default here). ``chunk_blocks``, ``start``, ``on_chunk``: a pass checkpointed
    and resumed in chunks (:func:`kernel_distill.label_solve.solve_labels`).

    Returns ``dict(metrics, labels, covariance)``: solved labels float32 ``(n, C)`` and the
    original-vs-solved label covariance ``(C, C)``. Nothing is selected, so no validation split is used.
    """
    import resource

    from kernel_distill.label_solve import label_covariance, solve_labels

    # the first ``train_limit`` images, or a seeded draw of them where the split is stored sorted by class
    x_train, y_train = limit_test(data.x_train, data.y_train, train_limit)
    began = time.perf_counter()
    result = solve_labels(kernel_fn, x_support, x_train.astype(dtype), centered_one_hot(y_train, data.num_classes),
                          reg=reg, ls_reg=ls_reg, get=get, block_size=block_size, progress=progress,
                          backend=backend, chunk_blocks=chunk_blocks, start=start, on_chunk=on_chunk)
    solve_seconds = time.perf_counter() - began
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    z_test = data.x_test.astype(dtype)
    began = time.perf_counter()
    natural, solved = evaluate_label_sets(kernel_fn, x_support, [original_labels, result.labels], z_test,
                                          data.y_test, reg, get, progress=progress,
                                          description="KRR test (both labels)", backend=backend)
    metrics = dict(test_accuracy=solved.accuracy, test_accuracy_original_labels=natural.accuracy,
                   support_size=len(x_support), num_train=result.num_train, num_test=solved.num_test,
                   solve_seconds=solve_seconds, test_seconds=time.perf_counter() - began, peak_rss_mb=peak_mb)
    return dict(metrics=metrics, labels=result.labels,
                covariance=label_covariance(original_labels, result.labels))


def natural_support(data: PreparedData, support_size: int, seed: int,
                    dtype: npt.DTypeLike = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A seeded class-balanced natural support of ``data``: ``(x preprocessed, centred one-hot labels)``."""
    if support_size < 1 or support_size % data.num_classes:
        raise KernelDistillError(f"the support size must be a positive multiple of {data.num_classes} "
                                 f"(class-balanced), got {support_size}")
    raw, y = natural_subset(data.raw_train, data.y_train, support_size // data.num_classes, data.num_classes, seed)
    return data.preprocessor.apply(raw).astype(dtype), centered_one_hot(y, data.num_classes)


def transfer_support(file_set: DistilledSet | None, source: str | None, dataset: str | None,
                     natural_per_class: int | None, seed: int = 0, data_dir: DataDir = None, zca: bool = False,
                     zca_reg: float = 0.1, progress: bool = True, log: Callable = print, val_size: int = 0) -> dict:
    """The training set of a transfer run: a distilled set, or a natural class-balanced subset.

    With ``val_size > 0``, ``val_size`` class-balanced training images (:func:`validation_split`, the
    split ``kip`` holds out by default) are held out as a validation split, mapped like the test images;
    a natural subset is then drawn from the rest only.

    Returns ``dict(x, y, preprocessor, dataset, source, checksums, x_val, y_val)`` (``x_val``/``y_val``
    None without validation).
    """
    checksums: dict[str, str] = {}
    if (file_set is None) == (natural_per_class is None):
        raise KernelDistillError("give a distilled-set FILE or --natural-per-class N (not both)")
    name = source if source is not None else "the distilled set"  # the file, in messages
    if file_set is not None:
        dataset = dataset_of(file_set, name, dataset)
    elif not dataset:
        raise KernelDistillError("--natural-per-class needs --dataset")
    info = dataset_info(dataset)
    x_raw: np.ndarray | None = None
    y_raw: np.ndarray | None = None
    train_idx: np.ndarray | None = None
    val_idx: np.ndarray | None = None
    if natural_per_class is not None or val_size:
        x_raw, y_raw = _load_split(dataset, "train", data_dir, progress, checksums)
        train_idx, val_idx = validation_split(y_raw, val_size, info.num_classes)
    if file_set is not None:
        preprocessor = preprocessing_for(file_set, name, dataset, data_dir, zca, zca_reg, progress, log,
                                         x_train=x_raw)
        support = dict(x=file_set.images, y=file_set.labels, source=source)
    else:
        # a natural subset: the training split was loaded above
        assert x_raw is not None and y_raw is not None and train_idx is not None and natural_per_class is not None
        preprocessor = fit_preprocessor(x_raw[train_idx], zca=zca, zca_reg=zca_reg)
        xs, ys = natural_subset(x_raw[train_idx], y_raw[train_idx], natural_per_class, info.num_classes, seed)
        support = dict(x=preprocessor.apply(xs), y=centered_one_hot(ys, info.num_classes),
                       source=f"{natural_per_class} natural images per class (seed {seed})")
    x_val = y_val = None
    if val_size:
        assert x_raw is not None and y_raw is not None and val_idx is not None  # loaded above when val_size > 0
        x_val, y_val = preprocessor.apply(x_raw[val_idx]), y_raw[val_idx]
    return dict(support, preprocessor=preprocessor, dataset=dataset, checksums=checksums, x_val=x_val, y_val=y_val)


TUNABLE = {"lr": ("learning_rate", float), "steps": ("steps", int), "optimizer": ("optimizer", str),
           "loss": ("loss", str), "augment": ("augment", str), "weight_decay": ("weight_decay", float),
           "batch_size": ("batch_size", int), "label_scale": ("label_scale", float)}
TUNING_SEED = 1000  # tuning runs use their own initialisations, not those of the reported seeds 0, 1, ...


def tuning_candidates(base_config: TrainConfig, grid: dict) -> list[TrainConfig]:
    """Every combination of ``grid`` (``{name: [values]}``, names from :data:`TUNABLE`) applied to
    ``base_config`` (a :class:`kernel_distill.finite.TrainConfig`), in grid order."""
    import itertools

    unknown = sorted(set(grid) - set(TUNABLE))
    if unknown:
        raise KernelDistillError(f"cannot tune {', '.join(unknown)}; tunable: {', '.join(TUNABLE)}")
    names = list(grid)
    candidates = []
    for values in itertools.product(*(grid[n] for n in names)):
        changes = {TUNABLE[n][0]: TUNABLE[n][1](v) for n, v in zip(names, values)}
        candidates.append(dataclasses.replace(base_config, **changes))
    return candidates


def tune_transfer(support: dict, model_fn: Callable, base_config: TrainConfig, grid: dict, progress: bool = True,
                  log: Callable = print) -> dict:
    """Choose a training protocol on the validation split: one run (seed ``TUNING_SEED``) per candidate of
    :func:`tuning_candidates`, scored on ``support["x_val"]`` only (the test set is not loaded here).

    Returns ``dict(config, candidates=[dict(changes, val_accuracy, seconds), ...])``; ``config`` is the
    candidate with the highest final validation accuracy (the first among equals).
    """
    import jax

    from kernel_distill.finite import train

    if support.get("x_val") is None or not len(support["x_val"]):
        raise KernelDistillError("tuning the transfer protocol needs a validation split (--val-size > 0)")
    candidates = tuning_candidates(base_config, grid)
    results = []
    for i, config in enumerate(candidates):
        changes = {n: getattr(config, TUNABLE[n][0]) for n in grid}
        run = train(model_fn(), support["x"], support["y"], None, None, config, jax.random.PRNGKey(TUNING_SEED),
                    progress, description=f"tune {i + 1}/{len(candidates)}", x_val=support["x_val"],
                    y_val=support["y_val"])
        results.append(dict(changes=changes, val_accuracy=run["val_accuracy"], seconds=run["seconds"]))
        log(f"tune {i + 1}/{len(candidates)} {' '.join(f'{k}={v}' for k, v in changes.items())}: validation "
            f"accuracy {100 * run['val_accuracy']:.2f}% ({run['seconds']:.0f} s)")
    best = max(range(len(results)), key=lambda i: (results[i]["val_accuracy"], -i))
    return dict(config=candidates[best], candidates=results, best=best)


def transfer(support: dict, model: str, train_config: TrainConfig, seeds: int, width: int | None = None,
             depth: int | None = None, parameterization: str = "standard", data_dir: DataDir = None,
             test_limit: int | None = None, progress: bool = True, tune_grid: dict | None = None,
             log: Callable = print, finished: Mapping[str, dict] | None = None,
             on_run: Callable[[str, dict], None] | None = None) -> dict:
    """Train ``seeds`` finite networks on ``support`` (from :func:`transfer_support`); score them on the test set.

    With ``tune_grid`` the protocol is first chosen on the support's validation split
    (:func:`tune_transfer`), before the test set is read; the seeds then train with the chosen protocol.
    With a validation split the seeds are scored on it too (``val_accuracy``).

    Resuming (``transfer --ranking --ranking-runs``): without a grid or a validation split, seed ``s`` is the
    ranking's ``set`` run of that seed and has its key (:func:`ranking_run_key`). A seed whose key is in
    ``finished`` (key -> entry as ``on_run`` received it) is not trained again; ``on_run(key, entry)`` is called
    after each seed trained here, ``entry`` = ``dict(variant="set", seed, eval_every, test_accuracy, curve,
    seconds, eval_seconds, num_parameters)``, so a transfer stopped after some of its seeds loses none of them.

    Returns ``dict(metrics, runs, train, checksums, tuning, reused)`` with accuracies as fractions; ``runs`` holds
    each seed's test curve; ``train`` the protocol used; ``tuning`` the candidates scored (None without a grid);
    ``checksums`` those of the splits read (the support's and the test split); ``reused`` the number of seeds
    taken from ``finished``.
    """
    from kernel_distill.finite import build_model, train_seeds

    dataset = support["dataset"]
    info = dataset_info(dataset)

    def model_fn():
        return build_model(model, info.num_classes, width, depth, parameterization)

    tuning = None
    if tune_grid:
        tuning = tune_transfer(support, model_fn, train_config, tune_grid, progress, log)
        train_config = tuning["config"]
    checksums = dict(support.get("checksums", {}))
    x_test, y_test = _load_split(dataset, "test", data_dir, progress, checksums, test_limit)
    z_test = support["preprocessor"].apply(x_test)
    keys: dict[int, str] = {}
    if (finished is not None or on_run is not None) and not tune_grid and support.get("x_val") is None:
        network = dict(model=model, width=width, depth=depth, parameterization=parameterization)
        keys = {seed: ranking_run_key("set", seed, support["x"], support["y"], z_test, y_test, train_config, network)
                for seed in range(seeds)}
    by_seed: dict[int, dict] = {}
    for seed, key in keys.items():
        kept = _finished_transfer_run(seed, train_config.eval_every, (finished or {}).get(key))
        if kept is not None:
            by_seed[seed] = kept
    reused = len(by_seed)
    missing = [seed for seed in range(seeds) if seed not in by_seed]
    if missing:
        trained = train_seeds(model_fn, support["x"], support["y"], z_test, y_test, train_config, missing,
                              progress=progress, x_val=support.get("x_val"), y_val=support.get("y_val"))
        for seed, r in zip(missing, trained["runs"]):
            by_seed[seed] = {k: r[k] for k in _TRANSFER_RUN_FIELDS + ("val_accuracy",) if k in r}
            if seed in keys and on_run is not None:
                on_run(keys[seed], dict(variant="set", seed=seed, eval_every=train_config.eval_every,
                                        **by_seed[seed]))
    runs = [dict(seed=seed, **{k: by_seed[seed][k] for k in ("test_accuracy", "curve", "seconds", "eval_seconds")})
            for seed in range(seeds)]
    accuracies = np.array([run["test_accuracy"] for run in runs])
    seconds = sum(r["seconds"] for r in runs)
    eval_seconds = sum(r["eval_seconds"] for r in runs)
    metrics = dict(test_accuracy=float(accuracies.mean()),
                   test_accuracy_std=float(accuracies.std(ddof=1)) if seeds > 1 else 0.0,
                   test_accuracies=accuracies.tolist(), num_test=len(y_test),
                   support_size=len(support["x"]), num_parameters=by_seed[0]["num_parameters"],
                   train_seconds=seconds - eval_seconds, eval_seconds=eval_seconds)
    if support.get("x_val") is not None:
        val = np.array([by_seed[seed]["val_accuracy"] for seed in range(seeds)])
        metrics.update(val_accuracy=float(val.mean()), val_accuracies=val.tolist(), num_val=len(support["y_val"]))
    return dict(metrics=metrics, runs=runs, train=dataclasses.asdict(train_config), checksums=checksums,
                tuning=tuning and dict(grid=tune_grid, candidates=tuning["candidates"], best=tuning["best"],
                                       tuning_seed=TUNING_SEED), reused=reused)


_TRANSFER_RUN_FIELDS = ("test_accuracy", "curve", "seconds", "eval_seconds", "num_parameters")


def _finished_transfer_run(seed: int, eval_every: int, entry: Mapping | None) -> dict | None:
    """A kept run as :func:`transfer` uses it, or None if there is none, it lacks a field (a run the ranking
    trained keeps no curve, and the record draws the transfer's curves) or its curve was scored every other
    number of steps (the key leaves ``eval_every`` out: it does not change the network)."""
    if entry is None or entry.get("seed") != seed or entry.get("eval_every") != eval_every or \
            any(k not in entry for k in _TRANSFER_RUN_FIELDS):
        return None
    run = {k: entry[k] for k in _TRANSFER_RUN_FIELDS}
    run["curve"] = [tuple(point) for point in run["curve"]]
    return run


# ----------------------------------------------------------------------------------------------------
# The field's evaluation standard (DD-Ranking, :mod:`kernel_distill.ranking`).

RANKING_AUGMENTATION = "dsa"  # the augmentation switched on for the ARS runs when the recipe has none


def ranking_runs(support: dict, model: str, train_config: TrainConfig, seeds: int, width: int | None = None,
                 depth: int | None = None, parameterization: str = "standard", data_dir: DataDir = None,
                 test_limit: int | None = None, full_hard_accuracy: float | None = None, progress: bool = True,
                 log: Callable = print, set_accuracies: Sequence[float] | None = None,
                 finished: Mapping[str, float] | None = None,
                 on_run: Callable[[str, dict], None] | None = None) -> dict:
    """Train the networks DD-Ranking compares, all with ``train_config`` (the recipe) and seeds ``0..seeds-1``,
    and score them on the test set.

    * ``set``: the distilled set with its own labels (the recipe as given);
    * ``random``: per seed ``s``, a class-balanced random subset of the training set of the same size (seed
      ``s``), natural labels, the same recipe and the set's preprocessing;
    * ``set_hard`` / ``random_hard``: both with hard labels (cross-entropy on the argmax, label scale 1);
    * ``set_natural_labels``: the set's images with its labels' argmax as one-hot labels, the recipe as given
      (what the learned labels add; skipped for a set whose labels are already one-hot);
    * ``set_aug_toggled`` / ``random_aug_toggled``: augmentation switched (``dsa`` on if the recipe has none,
      off otherwise), for the augmentation-robust score.

    ``full_hard_accuracy``: the full training set's accuracy with hard labels under the same recipe (a
    record; see ``benchmarks/ranking.py``), for HLR and LRS. ``set_accuracies``: the test accuracies of seeds
    ``0..seeds-1`` already trained on the set with ``train_config`` (what ``transfer`` just ran; training does
    not depend on ``eval_every``), used for ``set`` instead of training them again.

    Resuming: each run (variant, seed) has a key, :func:`ranking_run_key`, a hash of everything its accuracy
    depends on (the images, labels, preprocessed test set, network, recipe, seed and the training code).
    A run whose key is in ``finished`` (key -> test accuracy) is not trained again; ``on_run(key, entry)`` is
    called after each run trained here, ``entry`` = ``dict(variant, seed, test_accuracy, seconds)``.

    Returns ``dict(accuracies, stds, scores, runs, recipe, toggled_augment, checksums, reused)``; accuracies are
    means over seeds, as fractions; ``reused`` counts the runs taken from ``finished`` or ``set_accuracies``.
    """
    from kernel_distill import ranking
    from kernel_distill.finite import build_model, train_seeds

    dataset = support["dataset"]
    info = dataset_info(dataset)
    checksums = dict(support.get("checksums", {}))
    x_raw, y_raw = _load_split(dataset, "train", data_dir, progress, checksums)
    x_test, y_test = _load_split(dataset, "test", data_dir, progress, checksums, test_limit)
    pre = support["preprocessor"]
    z_test = pre.apply(x_test)
    n, num_classes = len(support["x"]), info.num_classes
    if n % num_classes:
        raise KernelDistillError(f"a random subset of the same size must be class-balanced: {n} images for "
                                 f"{num_classes} classes")
    per_class = n // num_classes

    def model_fn():
        return build_model(model, num_classes, width, depth, parameterization)

    train_config = dataclasses.replace(train_config, eval_every=train_config.steps)  # score once, at the end
    hard = dataclasses.replace(train_config, loss="ce", label_scale=1.0)
    toggled_augment = RANKING_AUGMENTATION if train_config.augment == "none" else "none"
    labels = np.asarray(support["y"], np.float32)
    one_hot = centered_one_hot(labels.argmax(axis=1), num_classes)
    variants = {"set": (train_config, labels), "set_hard": (hard, labels),
                "set_aug_toggled": (dataclasses.replace(train_config, augment=toggled_augment), labels)}
    if not np.allclose(labels, one_hot):
        variants["set_natural_labels"] = (train_config, one_hot)
    finished = dict(finished or {})
    if set_accuracies is not None and len(set_accuracies) != seeds:
        raise KernelDistillError(f"set_accuracies holds {len(set_accuracies)} runs for {seeds} seeds")
    network = dict(model=model, width=width, depth=depth, parameterization=parameterization)
    reused = 0

    def accuracy_of(variant: str, seed: int, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> float:
        nonlocal reused
        if variant == "set" and set_accuracies is not None:
            reused += 1
            return float(set_accuracies[seed])
        key = ranking_run_key(variant, seed, x, y, z_test, y_test, config, network)
        if key in finished:
            reused += 1
            return finished[key]
        result = train_seeds(model_fn, x, y, z_test, y_test, config, [seed], progress=progress)["runs"][0]
        if on_run is not None:
            on_run(key, dict(variant=variant, seed=seed, test_accuracy=result["test_accuracy"],
                             seconds=result["seconds"]))
        return float(result["test_accuracy"])

    accuracies, stds, runs = {}, {}, {}

    def summarise(name: str, accs: list[float]) -> None:
        accuracies[name] = float(np.mean(accs))
        stds[name] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        runs[name] = accs

    for name, (config, y) in variants.items():
        log(f"{name}: {n} images, loss {config.loss}, augment {config.augment}")
        summarise(name, [accuracy_of(name, seed, support["x"], y, config) for seed in range(seeds)])
    random_variants = {"random": train_config, "random_hard": hard,
                       "random_aug_toggled": dataclasses.replace(train_config, augment=toggled_augment)}
    subsets = [natural_subset(x_raw, y_raw, per_class, num_classes, seed) for seed in range(seeds)]
    subsets = [(np.asarray(pre.apply(xs), np.float32), centered_one_hot(ys, num_classes)) for xs, ys in subsets]
    for name, config in random_variants.items():
        log(f"{name}: {seeds} random subsets of {n} images, loss {config.loss}, augment {config.augment}")
        summarise(name, [accuracy_of(name, seed, xs, ys, config) for seed, (xs, ys) in enumerate(subsets)])
    if full_hard_accuracy is not None:
        accuracies["full_hard"] = float(full_hard_accuracy)
    scores = ranking.scores(accuracies, augmented=train_config.augment != "none")
    return dict(accuracies=accuracies, stds=stds, scores=scores, runs=runs, recipe=dataclasses.asdict(train_config),
                toggled_augment=toggled_augment, checksums=checksums, num_test=len(y_test), reused=reused)


def ranking_run_key(variant: str, seed: int, x: npt.ArrayLike, y: npt.ArrayLike, x_test: npt.ArrayLike,
                    y_test: npt.ArrayLike, config: TrainConfig, network: dict) -> str:
    """``sha256:...`` of what one ranking run's test accuracy depends on: training images ``x`` and labels ``y``
    (as float32), the preprocessed test images and labels, the recipe (``eval_every`` left out: it does not
    change training), the network, the seed, the variant's name, and the training code: the source of
    :mod:`kernel_distill.finite` and of the layer networks, and the JAX version (either may train
    differently, so a run of another one is not reused)."""
    import hashlib
    import importlib
    import inspect
    import json

    import jax

    recipe = {k: v for k, v in dataclasses.asdict(config).items() if k != "eval_every"}
    code = hashlib.sha256()
    for module in ("kernel_distill.finite", "kernel_distill.kernels.networks"):
        code.update(inspect.getsource(importlib.import_module(module)).encode())
    digest = hashlib.sha256(json.dumps(dict(variant=variant, seed=seed, recipe=recipe, network=network,
                                            code=code.hexdigest(), jax=jax.__version__), sort_keys=True).encode())
    for array in (x, y, x_test):
        array = np.ascontiguousarray(array, np.float32)
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    digest.update(np.ascontiguousarray(y_test, np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


def full_set_accuracy(dataset: str, model: str, train_config: TrainConfig, seeds: int = 1, width: int | None = None,
                      depth: int | None = None, parameterization: str = "standard", data_dir: DataDir = None,
                      test_limit: int | None = None, progress: bool = True,
                      preprocessor: Preprocessor | None = None) -> dict:
    """The hard-label accuracy of networks trained on the whole training split (DD-Ranking's ``real-hard``):
    cross-entropy, the recipe's optimiser, learning rate, batch, weight decay and augmentation, for
    ``train_config.steps`` steps; standardised per channel (fitted on the training split), or with
    ``preprocessor`` (a distilled set's own, e.g. its ZCA: the full set then sees what the set's images saw)."""
    from kernel_distill.finite import build_model, train_seeds

    info = dataset_info(dataset)
    checksums: dict[str, str] = {}
    x_raw, y_raw = _load_split(dataset, "train", data_dir, progress, checksums)
    x_test, y_test = _load_split(dataset, "test", data_dir, progress, checksums, test_limit)
    pre = preprocessor if preprocessor is not None else fit_preprocessor(x_raw)
    config = dataclasses.replace(train_config, loss="ce", label_scale=1.0, eval_every=train_config.steps)
    result = train_seeds(lambda: build_model(model, info.num_classes, width, depth, parameterization),
                         pre.apply(x_raw), centered_one_hot(y_raw, info.num_classes), pre.apply(x_test), y_test,
                         config, range(seeds), progress=progress)
    return dict(test_accuracy=result["mean"], test_accuracy_std=result["std"],
                test_accuracies=[r["test_accuracy"] for r in result["runs"]], num_train=len(y_raw),
                num_test=len(y_test), train_seconds=sum(r["seconds"] for r in result["runs"]),
                recipe=dataclasses.asdict(config), checksums=checksums)
