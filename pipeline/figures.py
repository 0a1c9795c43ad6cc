"""Figures a person can open: the image, its eigenvectors as RGB, and the segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def eigenvectors_rgb(x_ortho: np.ndarray, first: int = 1) -> np.ndarray:
    """Three components (from ``first``) rescaled to [0, 1] as an RGB image (y, x, 3)."""
    rgb = np.moveaxis(x_ortho[first : first + 3], 0, -1).astype(np.float64)
    if rgb.shape[-1] < 3:
        rgb = np.concatenate([rgb, np.zeros((*rgb.shape[:2], 3 - rgb.shape[-1]))], axis=-1)
    low, high = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    return (rgb - low) / np.where(high > low, high - low, 1)


def save_segmentation_figure(
    path: Path, rgb: np.ndarray, x_ortho: np.ndarray, labels: np.ndarray, title: str
) -> None:
    """A PNG with three panels: the input, eigenvectors 1-3 as RGB, and the segmentation overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    axes[1].imshow(eigenvectors_rgb(x_ortho), interpolation="nearest", extent=(0, rgb.shape[1], rgb.shape[0], 0))
    axes[1].set_title("eigenvectors 1-3 as RGB")
    axes[2].imshow(rgb)
    axes[2].imshow(labels, cmap="tab20", alpha=0.55, interpolation="nearest")
    axes[2].set_title(f"segmentation ({len(np.unique(labels))} regions)")
    for axis in axes:
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=80)
    plt.close(figure)
    tmp.replace(path)
