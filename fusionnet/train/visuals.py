"""PNG figures of a training step: a per-epoch grid of val crops and the loss curves.

matplotlib is imported lazily (Agg backend, no display) so importing the trainer stays light.
Files are written to a temp sibling and renamed, so a kill never leaves a truncated PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusionnet.io.atomic import write_atomic

GRID_COLUMNS = (
    ("image", "input"),
    ("gt", "ground truth"),
    ("fg_prob", "F"),
    ("one_minus_bg", "1 - B"),
    ("blend_weight", "beta"),
    ("alpha", "alpha"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def save_val_grid(visuals: dict[str, np.ndarray], path: Path, title: str = "") -> Path | None:
    """Rows = val crops; columns = input, ground truth, F, 1-B, beta, alpha.

    visuals: "image" (K,H,W,3) and the others (K,H,W), float in [0,1]. Returns None when empty.
    """
    if not visuals or len(visuals.get("image", ())) == 0:
        return None
    plt = _pyplot()
    rows = len(visuals["image"])
    fig, axes = plt.subplots(rows, len(GRID_COLUMNS), figsize=(1.6 * len(GRID_COLUMNS), 1.6 * rows + 0.4), squeeze=False)
    try:
        for r in range(rows):
            for c, (key, label) in enumerate(GRID_COLUMNS):
                ax = axes[r][c]
                img = np.clip(visuals[key][r], 0, 1)
                ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(label, fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def save_loss_curves(
    loss_log: Sequence[dict[str, float]], history: Sequence[dict], initial_val: dict | None, path: Path, title: str = ""
) -> Path | None:
    """Left: per-iteration loss terms (log scale; faint raw, bold running mean) and LR; right: val SAD per epoch (0 = initial)."""
    if not loss_log:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    try:
        its = [row["iteration"] for row in loss_log]
        window = max(1, len(loss_log) // 20)
        for key in sorted(k for k in loss_log[0] if k.startswith("loss")):
            values = np.array([row[key] for row in loss_log], dtype=np.float64)
            (line,) = ax_loss.plot(its, values, linewidth=0.6, alpha=0.35)
            # running mean over `window` iterations: batches differ a lot, the trend is what matters
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax_loss.plot(its[window - 1 :], smooth, color=line.get_color(), linewidth=1.5, label=key)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("iteration")
        ax_loss.legend(fontsize=7)
        ax_lr = ax_loss.twinx()
        ax_lr.plot(its, [row["lr"] for row in loss_log], color="gray", linestyle=":", linewidth=1)
        ax_lr.set_ylabel("lr (dotted)", fontsize=8)
        epochs = ([0] if initial_val else []) + [h["epoch"] for h in history]
        sads = ([initial_val["val_sad"]] if initial_val else []) + [h["val_sad"] for h in history]
        ax_val.plot(epochs, sads, marker="o")
        ax_val.set_xticks(epochs)
        ax_val.set_xlabel("epoch (0 = before training)")
        ax_val.set_ylabel("val SAD (transition band)")
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
