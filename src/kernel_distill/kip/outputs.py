"""What a KIP run leaves in its folder besides the checkpoint: the distilled sets, figures and results.json."""

from __future__ import annotations

import pathlib

import numpy as np

from kernel_distill import runs
from kernel_distill.data import PreparedData
from kernel_distill.io import DistilledSet, save_distilled
from kernel_distill.kip.checkpoint import CHECKPOINT, CONFIG, METRICS
from kernel_distill.kip.config import KipConfig
from kernel_distill.kip.state import KipState

RUN_FILES = (CONFIG, CHECKPOINT, METRICS, "distilled.npz", "distilled_best.npz", "grid.png", "curve.png",
             "results.json")


def write_outputs(config: KipConfig, data: PreparedData, state: KipState, records: list[dict],
                  out_dir: pathlib.Path, wall_seconds: float | None = None,
                  command_line: list[str] | None = None) -> dict:
    """distilled.npz (last), distilled_best.npz, grid.png, curve.png, results.json; returns the summary."""
    from kernel_distill import plots
    from kernel_distill.results import dataset_record, make_record, write_results

    selection = dict(split=config.select_on, val_size=data.num_val, step=state.best_step,
                     accuracy=state.best_accuracy)
    base_meta = dict(dataset=data.name, method="kip", per_class=config.per_class, seed=config.seed,
                     kernel=config.kernel.to_dict(), get=config.get, reg=config.reg, learn_labels=config.learn_labels,
                     config=config.to_dict(), selection=selection,
                     config_history=[{k: v for k, v in r.items() if k != "config"} for r in runs.read_history(out_dir)])
    last_meta = dict(base_meta, step=state.step,
                     metrics=dict(test_accuracy=state.last_accuracy, val_accuracy=state.last_val_accuracy))
    best_meta = dict(base_meta, step=state.best_step,
                     metrics=dict(test_accuracy=state.best_test_accuracy,
                                  val_accuracy=state.best_accuracy if config.select_on == "validation" else None))
    save_distilled(out_dir / "distilled.npz", DistilledSet(state.images, state.labels, data.preprocessor, last_meta))
    save_distilled(out_dir / "distilled_best.npz",
                   DistilledSet(state.best_images, state.best_labels, data.preprocessor, best_meta))
    viewable = data.preprocessor.to_viewable(state.images)
    # initial_state draws class by class; a warm-started support's classes are its labels' (None)
    original = None if config.init == "file" else np.repeat(np.arange(data.num_classes), config.per_class)
    plots.save_figure(out_dir / "grid.png", plots.image_grid_figure(
        viewable, state.labels, data.num_classes, data.class_names,
        title=f"KIP {data.name}, {config.per_class}/class, step {state.step}", original_classes=original))
    plots.save_figure(out_dir / "curve.png", plots.learning_curve_figure(
        records, title=f"KIP {data.name}, {config.kernel.architecture} {config.get.upper()}"))
    summary = dict(step=state.step, last_accuracy=state.last_accuracy, best_accuracy=state.best_accuracy,
                   best_step=state.best_step, best_test_accuracy=state.best_test_accuracy,
                   last_val_accuracy=state.last_val_accuracy, select_on=config.select_on, out_dir=str(out_dir))
    # The headline number is the selected support's (distilled_best.npz): selected on validation unless
    # the run asked for the papers' test-set selection, which ``selection`` then says.
    metrics = dict(test_accuracy=state.best_test_accuracy, test_accuracy_final=state.last_accuracy,
                   val_accuracy_best=state.best_accuracy if config.select_on == "validation" else None,
                   val_accuracy_final=state.last_val_accuracy, best_step=state.best_step, steps=state.step,
                   support_size=len(state.images), num_test=len(data.y_test[:config.test_limit]))
    curves = {key: [[r["step"], r[key]] for r in records if r.get(key) is not None]
              for key in ("loss", "val_accuracy", "test_accuracy")}
    record = make_record("kip", "kip", dataset_record(data.name, data.checksums, num_train=len(data.y_train),
                                                      num_val=data.num_val,
                                                      num_test=len(data.y_test[:config.test_limit])),
                         {k: v for k, v in metrics.items() if v is not None}, config.to_dict(), selection=selection,
                         curves=curves, artifacts=dict(distilled="distilled.npz", distilled_best="distilled_best.npz",
                                                       grid="grid.png", curve="curve.png", metrics="metrics.jsonl"),
                         dtype=np.dtype(config.dtype).name, wall_seconds=wall_seconds, argv=command_line)
    write_results(out_dir, record)
    return summary
