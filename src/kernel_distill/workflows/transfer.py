"""``kernel-distill transfer``: train finite networks on a distilled set (or a natural subset) and report
their real test accuracy; optionally tune the recipe on validation and score the set by DD-Ranking."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import TYPE_CHECKING, Any

from kernel_distill.errors import KernelDistillError
from kernel_distill.workflows import arguments
from kernel_distill.workflows.common import (Log, OnRecord, Preprocessing, argv, check_positive, distilled_path,
                                             output_folder, refuse_preprocessing_options, write_record)

if TYPE_CHECKING:
    from kernel_distill.finite import TrainConfig

MODEL_CHOICES = ("convnet", "convnet3", "fc", "evalnet")  # finite.MODELS
AUGMENT_CHOICES = ("none", "crop", "flip-crop", "dsa")  # finite.AUGMENTATIONS


@dataclasses.dataclass(frozen=True)
class FiniteNetwork:
    """The finite network trained: ``model`` (one of :data:`MODEL_CHOICES`), its width and depth (``None``:
    the model's default) and weight parameterization."""

    model: str = "convnet"
    width: int | None = None
    depth: int | None = None
    parameterization: str = "standard"


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """How each network is trained (the options of :class:`kernel_distill.finite.TrainConfig`);
    ``lr`` ``None``: the model's default learning rate."""

    steps: int = 1000
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 5e-4
    loss: str = "mse"
    label_scale: float = 1.0
    batch_size: int = 256
    augment: str = "none"
    eval_every: int = 100

    def train_config(self, model: str) -> TrainConfig:
        """The library's training config; a bad value is refused here, before any data is loaded."""
        from kernel_distill.finite import TrainConfig, default_learning_rate

        return TrainConfig(steps=self.steps, optimizer=self.optimizer,
                           learning_rate=default_learning_rate(model) if self.lr is None else self.lr,
                           weight_decay=self.weight_decay, loss=self.loss, batch_size=self.batch_size,
                           eval_every=self.eval_every, augment=self.augment, label_scale=self.label_scale)


@dataclasses.dataclass(frozen=True)
class TransferRequest:
    """Train ``seeds`` networks on ``file`` (a distilled set or ``zoo:NAME``) or on a natural subset of
    ``natural_per_class`` images per class (seed ``seed``), and score them on the test set.

    ``tune``: ``NAME=V1,V2`` grids (names from :data:`kernel_distill.experiments.TUNABLE`) chosen on a validation
    split of ``val_size`` images (default 5000 with ``tune``, else none). ``ranking``: also DD-Ranking's runs
    and scores; ``full_set_accuracy`` (a fraction) adds HLR and LRS; ``ranking_runs``: a JSON-lines file of
    finished runs (the transfer's own seeds and the ranking's), appended to after each run and read first, so
    an interrupted ``--ranking`` resumes where it stopped (:func:`read_finished_runs`; nothing is kept with a
    validation split). ``out``: a folder for ``results.json`` and ``transfer_curve.png`` (none: nothing is
    written)."""

    file: str | None = None
    dataset: str | None = None
    natural_per_class: int | None = None
    seed: int = 0
    network: FiniteNetwork = dataclasses.field(default_factory=FiniteNetwork)
    recipe: TrainingRecipe = dataclasses.field(default_factory=TrainingRecipe)
    seeds: int = 3
    val_size: int | None = None
    tune: tuple[str, ...] = ()
    ranking: bool = False
    full_set_accuracy: float | None = None
    ranking_runs: str | None = None
    test_limit: int | None = None
    out: str | None = None
    overwrite: bool = False
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    data_dir: str | None = None
    progress: bool = True
    command_line: tuple[str, ...] | None = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("transfer", help="train finite networks on a distilled set; report real test accuracy")
    p.add_argument("file", nargs="?", default=None,
                   help="distilled set (.npz or zoo:NAME); omit with --natural-per-class")
    p.add_argument("--dataset", default=None, help="test data (default: the file's metadata)")
    p.add_argument("--natural-per-class", type=int, default=None,
                   help="instead of a file, a random natural class-balanced subset of this size (baseline)")
    p.add_argument("--model", choices=MODEL_CHOICES, default="convnet",
                   help="finite network: the KIP ConvNet (default), it without the first conv (convnet3), a fully "
                        "connected net (fc), or the field's evaluation ConvNet (evalnet: width 128, instance norm)")
    p.add_argument("--width", type=int, default=None, help="channels / units (convnet 128, fc 1024)")
    p.add_argument("--depth", type=int, default=None, help="conv blocks (3) or hidden layers (1)")
    p.add_argument("--parameterization", choices=("standard", "ntk"), default="standard",
                   help="weight parameterization of the finite network (default standard)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per seed (default 1000)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="sgd (momentum 0.9, cosine schedule; default) or adam")
    p.add_argument("--lr", type=arguments.POSITIVE, default=None,
                   help="learning rate (default 0.05; 0.01 for convnet and convnet3, which have no normalisation)")
    p.add_argument("--weight-decay", type=arguments.NON_NEGATIVE, default=5e-4,
                   help="L2 weight decay, added to the gradient before the optimiser (coupled; default 5e-4)")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="mse on the (learned) labels or cross-entropy on their argmax")
    p.add_argument("--label-scale", type=arguments.POSITIVE, default=1.0,
                   help="mse: fit label-scale x the labels (RFAD's finite-network protocol; default 1)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per step (default 256; the whole set when it is smaller)")
    p.add_argument("--augment", choices=AUGMENT_CHOICES, default="none",
                   help="random translations of up to 4 pixels (crop), and left-right flips (flip-crop, for "
                        "natural images) of each batch; or DSA's evaluation augmentation (dsa: per batch one "
                        "of colour, crop, cutout, flip, scale, rotation)")
    p.add_argument("--eval-every", type=int, default=100, help="test-accuracy interval in steps (default 100)")
    p.add_argument("--val-size", type=int, default=None,
                   help="class-balanced training images held out as a validation split (the one kip holds "
                        "out), scored beside the test set; default 0, or 5000 with --tune")
    p.add_argument("--tune", action="append", default=None, metavar="NAME=V1,V2,...",
                   help="choose the protocol on the validation split before the test set is read: one run per "
                        "combination; NAME is lr, steps, optimizer, loss, augment, weight_decay, batch_size or "
                        "label_scale "
                        "(repeat the option for a grid, e.g. --tune lr=0.01,0.05 --tune steps=300,1000)")
    p.add_argument("--seeds", type=int, default=3, help="training runs with seeds 0..N-1 (default 3)")
    p.add_argument("--ranking", action="store_true",
                   help="also score the set by the field's standard (DD-Ranking): the same recipe on a random "
                        "class-balanced subset of the same size, with hard labels, with the augmentation switched, "
                        "and on the set's images with one-hot labels: gain over random (IOR), HLR, LRS, ARS "
                        "(docs/TRANSFER.md)")
    p.add_argument("--full-set-accuracy", type=arguments.number(0.0), default=None, metavar="FRACTION",
                   help="with --ranking: the full training set's hard-label test accuracy under the same recipe "
                        "(a record of benchmarks/ranking.py), for HLR and LRS")
    p.add_argument("--ranking-runs", default=None, metavar="FILE",
                   help="with --ranking: a JSON-lines file that keeps each finished run (the transfer's "
                        "own seeds and the ranking's: up to 21 networks for 3 seeds); "
                        "runs already in it with the same images, labels, recipe, seed and training code are not "
                        "trained again, so an interrupted --ranking resumes")
    p.add_argument("--seed", type=int, default=0, help="seed of the natural subset")
    p.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only")
    p.add_argument("--out", default=None, help="folder for results.json and transfer_curve.png (new or empty)")
    arguments.add_overwrite(p)
    arguments.add_preprocess(p)
    arguments.add_common(p, kernel_options=False)  # finite networks train in float32 and need no kernel memory budget


def request_from_args(args: argparse.Namespace) -> TransferRequest:
    return TransferRequest(
        file=args.file, dataset=args.dataset, natural_per_class=args.natural_per_class, seed=args.seed,
        network=FiniteNetwork(args.model, args.width, args.depth, args.parameterization),
        recipe=TrainingRecipe(steps=args.steps, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                              loss=args.loss, label_scale=args.label_scale, batch_size=args.batch_size,
                              augment=args.augment, eval_every=args.eval_every),
        seeds=args.seeds, val_size=args.val_size, tune=tuple(args.tune or ()), ranking=args.ranking,
        full_set_accuracy=args.full_set_accuracy, ranking_runs=args.ranking_runs, test_limit=args.test_limit, out=args.out, overwrite=args.overwrite,
        preprocessing=arguments.preprocessing(args), data_dir=args.data_dir, progress=not args.no_progress,
        command_line=arguments.command_line(args))


def run(request: TransferRequest, log: Log = print, on_record: OnRecord | None = None) -> dict:
    """Check the request (every tuning candidate too) before any data is loaded, own ``out``, train and score;
    returns the result record."""
    check_positive("--seeds", request.seeds, allow_none=False)
    for name, value in (("--test-limit", request.test_limit), ("--width", request.network.width),
                        ("--depth", request.network.depth), ("--natural-per-class", request.natural_per_class)):
        check_positive(name, value)
    config = request.recipe.train_config(request.network.model)
    if (request.file is None) == (request.natural_per_class is None):
        raise KernelDistillError("give a distilled-set FILE or --natural-per-class N (not both)")
    if request.ranking and request.file is None:
        raise KernelDistillError("--ranking scores a distilled set against random subsets: give a FILE")
    if request.full_set_accuracy is not None and not (request.ranking and request.full_set_accuracy <= 1):
        raise KernelDistillError("--full-set-accuracy is a fraction in [0, 1] and goes with --ranking")
    if request.ranking_runs is not None and not request.ranking:
        raise KernelDistillError("--ranking-runs keeps the runs of --ranking: give --ranking too")
    finished = read_finished_runs(request.ranking_runs) if request.ranking_runs else None
    if request.ranking and request.tune:
        raise KernelDistillError("--ranking scores one fixed recipe; choose it first with --tune, then give it")
    grid = tune_grid(request.tune, config)
    val_size = request.val_size
    if val_size is None:
        val_size = 5000 if grid else 0
    if val_size < 0:
        raise KernelDistillError(f"--val-size must be 0 or positive, got {val_size}")
    if grid and not val_size:
        raise KernelDistillError("--tune needs a validation split: --val-size must be positive")
    with output_folder(request.out, "transfer", request.overwrite):
        record = _transfer(request, config, grid, val_size, log, finished)
        return write_record(request.out, record, on_record)


def tune_grid(options: tuple[str, ...], config: TrainConfig) -> dict[str, list[Any]] | None:
    """``NAME=V1,V2`` options as ``{NAME: [V1, V2]}``, each candidate checked before data is loaded."""
    from kernel_distill.experiments import TUNABLE, tuning_candidates

    if not options:
        return None
    grid: dict[str, list[Any]] = {}
    for option in options:
        name, sep, values = option.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise KernelDistillError(f"--tune takes NAME=V1,V2,..., got {option!r}")
        if name not in TUNABLE:
            raise KernelDistillError(f"--tune cannot tune {name!r}; tunable: {', '.join(TUNABLE)}")
        if name in grid:
            raise KernelDistillError(f"--tune {name} given twice")
        try:
            grid[name] = [TUNABLE[name][1](v.strip()) for v in values.split(",")]
        except ValueError:
            raise KernelDistillError(f"--tune {name}: cannot read {values!r} as a list of "
                                     f"{TUNABLE[name][1].__name__} values") from None
    tuning_candidates(config, grid)  # TrainConfig checks every value (a negative lr, an unknown loss, ...)
    return grid


def read_finished_runs(path: str | pathlib.Path) -> dict[str, dict]:
    """The finished runs of a ``--ranking-runs`` file, ``{key: entry}`` as :func:`append_finished_run` wrote them
    (``test_accuracy`` checked to be a fraction; none if the file does not exist yet). A last line without its
    newline was cut short by a kill and is ignored (that run is trained again, and :func:`append_finished_run`
    drops the cut line); a bad complete line is an error, since the file is then not what this tool wrote."""
    import json
    import math

    path = pathlib.Path(path)
    if not path.exists():
        return {}
    if not path.is_file():
        raise KernelDistillError(f"--ranking-runs {path}: not a file")
    lines = path.read_bytes().split(b"\n")[:-1]  # the part after the last newline is a cut line, or empty
    finished = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key, accuracy = entry["key"], float(entry["test_accuracy"])
            if not (isinstance(key, str) and key.startswith("sha256:") and math.isfinite(accuracy)
                    and 0.0 <= accuracy <= 1.0):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise KernelDistillError(f"--ranking-runs {path}:{number}: not a run written by --ranking-runs") from None
        finished[key] = dict(entry, test_accuracy=accuracy)
    return finished


def append_finished_run(path: str | pathlib.Path, key: str, entry: dict) -> None:
    """Append one finished run to a ``--ranking-runs`` file as a JSON line, on disk before returning; a last
    line cut short by a kill (no newline) is dropped first."""
    import json
    import os

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0)
        content = f.read()
        if content and not content.endswith(b"\n"):
            f.truncate(content.rfind(b"\n") + 1)
        f.write((json.dumps(dict(key=key, **entry)) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _transfer(request: TransferRequest, config: TrainConfig, grid: dict | None, val_size: int, log: Log,
              finished: dict[str, dict] | None = None) -> dict:
    from kernel_distill import experiments, plots
    from kernel_distill.io import load_distilled
    from kernel_distill.results import dataset_record, make_record

    start = time.perf_counter()
    net, pre = request.network, request.preprocessing
    distilled = None
    if request.file:
        distilled = load_distilled(distilled_path(request.file, request.data_dir, request.progress),
                                   request.data_dir, request.progress)
        refuse_preprocessing_options(pre, distilled, request.file)
    support = experiments.transfer_support(distilled, request.file, request.dataset, request.natural_per_class,
                                           request.seed, request.data_dir, pre.zca, pre.reg,
                                           progress=request.progress, log=log, val_size=val_size)
    runs_file, source_name = request.ranking_runs, request.file

    def keep_run(key: str, entry: dict) -> None:
        if runs_file:
            append_finished_run(runs_file, key, dict(entry, source=source_name))

    result = experiments.transfer(support, net.model, config, request.seeds, net.width, net.depth,
                                  net.parameterization, request.data_dir, request.test_limit, request.progress,
                                  tune_grid=grid, log=log, finished=finished if runs_file else None,
                                  on_run=keep_run if runs_file else None)
    if result["reused"]:
        log(f"transfer: {result['reused']} of {request.seeds} seeds reused from {runs_file}")
    ranking = None
    if request.ranking:
        finished_accuracies = None if finished is None else {k: e["test_accuracy"] for k, e in finished.items()}
        ranking = experiments.ranking_runs(support, net.model, config, request.seeds, net.width, net.depth,
                                           net.parameterization, request.data_dir, request.test_limit,
                                           request.full_set_accuracy, progress=request.progress, log=log,
                                           set_accuracies=[r["test_accuracy"] for r in result["runs"]],
                                           finished=finished_accuracies, on_run=keep_run)
        if ranking["reused"]:
            log(f"ranking: {ranking['reused']} runs reused ({request.seeds} of them the transfer's own"
                f"{', the rest from ' + str(runs_file) if runs_file else ''})")
        result["metrics"].update({f"ranking_{k}": v for k, v in ranking["scores"].items()})
        result["metrics"].update({f"ranking_accuracy_{k}": v for k, v in ranking["accuracies"].items()})
        _log_ranking(ranking, log)
    metrics, dataset, source = result["metrics"], support["dataset"], support["source"]
    if result["tuning"]:
        chosen = result["tuning"]["candidates"][result["tuning"]["best"]]
        log(f"protocol chosen on {metrics['num_val']} validation images (test set not used): "
            f"{' '.join(f'{k}={v}' for k, v in chosen['changes'].items())} "
            f"({100 * chosen['val_accuracy']:.2f}% on validation)")
    if "val_accuracy" in metrics:
        log(f"validation accuracy {100 * metrics['val_accuracy']:.2f}% over {request.seeds} seeds")
    log(f"{net.model} ({metrics['num_parameters']:,} parameters) trained {result['train']['steps']} steps on {source}: "
        f"test accuracy {100 * metrics['test_accuracy']:.2f} +- {100 * metrics['test_accuracy_std']:.2f}% over "
        f"{request.seeds} seeds on {metrics['num_test']} {dataset} test images ({metrics['train_seconds']:.0f} s "
        f"training, {metrics['eval_seconds']:.0f} s testing)")
    run_config = dict(source=source, file=request.file, natural_per_class=request.natural_per_class,
                      seed=request.seed, model=net.model, width=net.width, depth=net.depth,
                      parameterization=net.parameterization, seeds=request.seeds, train=result["train"], zca=pre.zca,
                      zca_reg=pre.reg, test_limit=request.test_limit, val_size=val_size, tuning=result["tuning"],
                      reused_seeds=result["reused"],
                      ranking=ranking and dict(runs=ranking["runs"], stds=ranking["stds"],
                                               toggled_augment=ranking["toggled_augment"],
                                               full_set_accuracy=request.full_set_accuracy,
                                               reused=ranking["reused"]))
    curves = {f"transfer_test_accuracy_seed{r['seed']}": r["curve"] for r in result["runs"]}
    artifacts = {}
    if request.out:
        out = pathlib.Path(request.out)
        plots.save_figure(out / "transfer_curve.png", plots.transfer_figure(curves, title=f"{net.model} on {source}"))
        artifacts["transfer_curve"] = "transfer_curve.png"
        log(f"outputs in {out}: results.json, transfer_curve.png")
    return make_record("transfer", "transfer",
                       dataset_record(dataset, result["checksums"], num_test=metrics["num_test"]), metrics, run_config,
                       curves=curves, artifacts=artifacts, dtype="float32",
                       selection=dict(split="validation", num_val=metrics["num_val"]) if result["tuning"] else None,
                       wall_seconds=time.perf_counter() - start, argv=argv(request.command_line))


def _log_ranking(ranking: dict, log: Log) -> None:
    acc, scores = ranking["accuracies"], ranking["scores"]
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())
    log(f"DD-Ranking runs (test accuracy, mean over seeds): {shown}")
    parts = [f"IOR {100 * scores['ior']:+.2f} points"] if "ior" in scores else []
    if "hlr" in scores:
        parts.append(f"HLR {100 * scores['hlr']:.2f} points")
    for key in ("lrs", "ars"):
        if key in scores:
            parts.append(f"{key.upper()} {100 * scores[key]:.2f}%")
    if "hlr" not in scores:
        parts.append("HLR and LRS need --full-set-accuracy")
    log("DD-Ranking scores: " + "; ".join(parts))
