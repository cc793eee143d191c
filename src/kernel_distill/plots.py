"""Figures: support-image grids, learning curves, heat maps, transfer curves, accuracy against support size.

Every ``*_figure`` function returns a matplotlib :class:`~matplotlib.figure.Figure` (headless, no pyplot
state), so the PNG files a command writes and the HTML report (:mod:`kernel_distill.report`) draw the same
pictures. :func:`save_figure` writes one atomically; :func:`figure_png` gives its PNG bytes.
"""

from __future__ import annotations

import io
import os

from typing import TYPE_CHECKING

import numpy as np

from kernel_distill.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The PNG bytes of ``fig``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(path: str | os.PathLike, fig: Figure, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG, atomically."""
    atomic_write_bytes(path, figure_png(fig, dpi))


def image_grid_figure(images: np.ndarray, labels: np.ndarray, num_classes: int,
                      class_names: tuple[str, ...] | None = None, title: str = "",
                      original_classes: np.ndarray | None = None, max_columns: int = 20) -> Figure:
    """Support images, one row per class, at most ``max_columns`` per row.

    Args:
      images: float ``(n, H, W, C)`` in ``[0, 1]``.
      labels: float ``(n, num_classes)`` (learned, solved or one-hot); each image is titled with the
        argmax class of its label and that label's value.
      original_classes: int ``(n,)``, the class each image started from (KIP keeps the class-balanced
        initial order); rows group by it when given, else by the label's argmax.
    """
    label_classes = labels.argmax(axis=1)
    groups = label_classes if original_classes is None else np.asarray(original_classes)
    rows = [np.flatnonzero(groups == c) for c in range(num_classes)]
    cols_shown = min(max(1, max(len(r) for r in rows)), max_columns)
    fig = _new_figure((1.1 * cols_shown, 1.2 * num_classes))
    axes = fig.subplots(num_classes, cols_shown, squeeze=False)
    for c, row in enumerate(rows):
        for j in range(cols_shown):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j >= len(row):
                continue
            i = row[j]
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            shown = label_classes[i]
            # A learned label whose argmax left the row's class is marked, so a drift is visible.
            ax.set_title(f"{shown}: {labels[i, shown]:.2f}", fontsize=7, color="black" if shown == c else "tab:red")
        name = class_names[c] if class_names else str(c)
        axes[c, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def learning_curve_figure(records: list[dict], title: str = "") -> Figure:
    """KRR training loss, and validation and test accuracy, against step, from ``metrics.jsonl`` records.

    Records with ``"loss"`` give the loss curve, those with ``"val_accuracy"`` / ``"test_accuracy"`` the
    accuracy curves.
    """
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig = _new_figure((6, 3.5))
    ax_loss = fig.subplots()
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", lw=1, label="training loss")
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("KRR training loss", color="tab:blue")
    ax_acc = ax_loss.twinx()
    for key, color, name in (("val_accuracy", "tab:green", "validation"), ("test_accuracy", "tab:red", "test")):
        points = [(r["step"], 100 * r[key]) for r in records if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), color=color, marker="o", ms=3, label=f"{name} accuracy")
    ax_acc.set_ylabel("accuracy (%)")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
    if handles:
        ax_acc.legend(handles=handles, fontsize=7, loc="center right")
    if title:
        ax_loss.set_title(title, fontsize=9)
    return fig


def heatmap_figure(matrix: np.ndarray, row_label: str, col_label: str, tick_names: tuple[str, ...] | None = None,
                   title: str = "") -> Figure:
    """A ``(C, C)`` matrix as a diverging heat map with a colour bar."""
    matrix = np.asarray(matrix, dtype=float)
    limit = float(np.abs(matrix).max()) or 1.0
    fig = _new_figure((5.5, 4.5))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax)
    ticks = np.arange(matrix.shape[0])
    names = tick_names if tick_names and len(tick_names) == matrix.shape[0] else [str(t) for t in ticks]
    if matrix.shape[0] <= 20:
        ax.set_xticks(ticks, names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def transfer_figure(curves: dict[str, list], title: str = "") -> Figure:
    """Finite-network test accuracy against training step, one line per seed.

    Args:
      curves: name -> ``[(step, accuracy), ...]`` with accuracies as fractions.
    """
    fig = _new_figure((6, 3.5))
    ax = fig.subplots()
    for name, points in curves.items():
        if points:
            steps, acc = zip(*points)
            ax.plot(steps, 100 * np.asarray(acc), marker="o", ms=3, label=name.replace("transfer_test_accuracy_", ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    if curves:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def accuracy_vs_size_figure(points: list[dict], title: str = "") -> Figure:
    """Test accuracy against support size (log scale), one line per (method, dataset).

    Args:
      points: dicts with ``method``, ``dataset``, ``support_size`` and ``test_accuracy`` (a fraction).
    """
    fig = _new_figure((6.5, 4))
    ax = fig.subplots()
    series: dict = {}
    for p in points:
        series.setdefault((p["dataset"], p["method"]), []).append((p["support_size"], 100 * p["test_accuracy"]))
    for (dataset, method), values in sorted(series.items()):
        values.sort()
        ax.plot(*zip(*values), marker="o", label=f"{dataset}: {method}")
    ax.set_xscale("log")
    ax.set_xlabel("support size (images)")
    ax.set_ylabel("test accuracy (%)")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return fig

