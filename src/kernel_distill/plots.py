"""PNG outputs: support-image grids and learning curves (matplotlib, headless)."""

from __future__ import annotations

import io
import os

import numpy as np

from kernel_distill.io import atomic_write_bytes


def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def save_image_grid(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    class_names: tuple[str, ...] | None = None, title: str = "") -> None:
    """One row per class (by the label's argmax), images in ``[0, 1]``.

    Args:
      images: float ``(n, H, W, C)`` in ``[0, 1]``.
      labels: float ``(n, num_classes)``; each image is titled with its argmax class and value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = labels.argmax(axis=1)
    rows = [np.flatnonzero(classes == c) for c in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    cols_shown = min(cols, 20)
    fig, axes = plt.subplots(num_classes, cols_shown, figsize=(1.1 * cols_shown, 1.2 * num_classes),
                             squeeze=False)
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
            ax.set_title(f"{c}: {labels[i, c]:.2f}", fontsize=7)
        name = class_names[c] if class_names else str(c)
        axes[c, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)


def save_learning_curve(path: str | os.PathLike, records: list[dict], title: str = "") -> None:
    """Training loss and test accuracy against step, from ``metrics.jsonl``-style records.

    Records with ``"loss"`` give the loss curve, those with ``"test_accuracy"`` the accuracy curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    acc = [(r["step"], 100 * r["test_accuracy"]) for r in records if "test_accuracy" in r]
    fig, ax_loss = plt.subplots(figsize=(6, 3.5))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", lw=1)
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("KRR training loss", color="tab:blue")
    ax_acc = ax_loss.twinx()
    if acc:
        ax_acc.plot(*zip(*acc), color="tab:red", marker="o", ms=3)
    ax_acc.set_ylabel("test accuracy (%)", color="tab:red")
    if title:
        ax_loss.set_title(title, fontsize=9)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)


def save_heatmap(path: str | os.PathLike, matrix: np.ndarray, row_label: str, col_label: str,
                 tick_names: tuple[str, ...] | None = None, title: str = "") -> None:
    """A ``(C, C)`` matrix as a diverging heat map with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(np.abs(matrix).max()) or 1.0
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
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
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)
