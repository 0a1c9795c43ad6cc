"""Figures a person can open: the image, its eigenvectors as RGB, PCA of X, the semantic map, object
proposals, a contact sheet per dataset, and for the explorer each image's eigenvectors and regions with
a row per graph kind and the per-layer agreement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.base import IGNORE

TOP_PROPOSALS = 8  # proposals drawn on a figure (best first)


@dataclass(frozen=True)
class ImageView:
    """What the figures show of one image, at the preprocessed image's size."""

    item: str
    rgb: np.ndarray  # (y, x, 3) uint8
    semantic: np.ndarray  # (y, x) region per pixel
    proposals: np.ndarray | None = None  # (n, y, x) bool, best first
    scores: np.ndarray | None = None  # (n,)


def model_caption(attrs: dict) -> str:
    """'model tiny-vit (random initialisation (NOT pretrained))': said on every figure, with the weights'
    source when the model has one."""
    weights = attrs.get("weights", "unknown weights")
    return f"model {attrs.get('model', '?')} ({weights}{'; ' + attrs['source'] if attrs.get('source') else ''})"


def rescale_rgb(channels: np.ndarray) -> np.ndarray:
    """(y, x, <=3) -> (y, x, 3) in [0, 1], each channel min-max scaled (missing channels black)."""
    rgb = channels.astype(np.float64)
    if rgb.shape[-1] < 3:
        rgb = np.concatenate([rgb, np.zeros((*rgb.shape[:2], 3 - rgb.shape[-1]))], axis=-1)
    low, high = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    return (rgb - low) / np.where(high > low, high - low, 1)


def eigenvectors_rgb(x_ortho: np.ndarray, first: int = 1) -> np.ndarray:
    """Three components (from ``first``) rescaled to [0, 1] as an RGB image (y, x, 3)."""
    return rescale_rgb(np.moveaxis(x_ortho[first : first + 3], 0, -1))


def pca_rgb(x: np.ndarray) -> np.ndarray:
    """The first three principal components of X's tokens (channel, y, x) as an RGB image (y, x, 3)."""
    channels, height, width = x.shape
    tokens = x.reshape(channels, -1).T.astype(np.float64)
    tokens -= tokens.mean(0)
    _, _, vt = np.linalg.svd(tokens, full_matrices=False)
    return rescale_rgb((tokens @ vt[:3].T).reshape(height, width, -1))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_semantic(axis, view: ImageView) -> None:
    axis.imshow(view.rgb)
    axis.imshow(view.semantic, cmap="tab20", alpha=0.55, interpolation="nearest")


def show_proposals(axis, view: ImageView, top: int = TOP_PROPOSALS) -> None:
    """The best proposals as coloured masks with their boxes and scores."""
    from matplotlib.patches import Rectangle
    from matplotlib import colormaps

    axis.imshow(view.rgb)
    colours = colormaps["tab10"]
    overlay = np.zeros((*view.rgb.shape[:2], 4))
    shown = list(zip(view.proposals, view.scores))[:top]
    for rank, (mask, score) in reversed(list(enumerate(shown))):  # the best drawn last, on top
        colour = colours(rank % 10)
        overlay[mask] = (*colour[:3], 0.45)
        ys, xs = np.nonzero(mask)
        axis.add_patch(Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1, fill=False, edgecolor=colour, linewidth=1.5))
        axis.text(xs.min(), ys.min(), f"{score:.2f}", color="white", fontsize=7, va="bottom", bbox={"facecolor": colour, "pad": 1, "linewidth": 0})
    axis.imshow(overlay, interpolation="nearest")


def save_png(figure, path: Path, dpi: int = 80) -> None:
    """Write a matplotlib figure atomically (a half-written PNG never appears under its name)."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=dpi)
    plt.close(figure)
    tmp.replace(path)


def eigenvector_panels(components: int, first: int = 1, panels: int = 4) -> list[tuple[str, int]]:
    """(label, first stored component) of each RGB panel of three eigenvectors: up to ``panels`` of
    them, from stored component ``first`` (1 skips a solver's near-constant component 0; a baseline
    stores none), numbered from 1 as nontrivial eigenvectors."""
    starts = range(first, min(components, first + 3 * panels), 3)
    return [(f"eigenvectors {s - first + 1}-{min(s + 2, components - 1) - first + 1} as RGB", s) for s in starts]


def save_image_figure(path: Path, view: ImageView, x: np.ndarray, x_ortho: np.ndarray, title: str, first: int = 1) -> None:
    """One PNG per image: the input, eigenvectors 1-3, 4-6, ... (from stored component ``first``) as
    RGB, PCA of X, the semantic map and the best proposals with boxes and scores."""
    plt = _plt()
    extent = (-0.5, view.rgb.shape[1] - 0.5, view.rgb.shape[0] - 0.5, -0.5)
    panels = [("input", lambda axis: axis.imshow(view.rgb))]
    for label, start in eigenvector_panels(x_ortho.shape[0], first):
        panels.append((label, lambda axis, f=start: axis.imshow(eigenvectors_rgb(x_ortho, f), interpolation="nearest", extent=extent)))
    panels.append(("PCA of X (3 components)", lambda axis: axis.imshow(pca_rgb(x), interpolation="nearest", extent=extent)))
    panels.append((f"semantic map ({len(np.unique(view.semantic))} regions)", lambda axis: show_semantic(axis, view)))
    if view.proposals is not None:
        shown = min(len(view.proposals), TOP_PROPOSALS)
        panels.append((f"proposals (best {shown} of {len(view.proposals)})", lambda axis: show_proposals(axis, view)))
    columns = 4
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows * view.rgb.shape[0] / view.rgb.shape[1] + 0.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (name, draw) in zip(axes.ravel(), panels):
        draw(axis)
        axis.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_png(figure, path)


def save_contact_sheet(path: Path, views: list[ImageView], title: str, semantic_name: str) -> None:
    """A grid with one row per image: the input, the semantic map and (when computed) the proposals."""
    plt = _plt()
    columns = 3 if any(v.proposals is not None for v in views) else 2
    figure, axes = plt.subplots(len(views), columns, figsize=(2.6 * columns, 2.2 * len(views) + 0.5), squeeze=False)
    for row, view in zip(axes, views):
        for axis in row:
            axis.axis("off")
        row[0].imshow(view.rgb)
        row[0].set_title(view.item, fontsize=7)
        show_semantic(row[1], view)
        if columns == 3 and view.proposals is not None:
            show_proposals(row[2], view)
    axes[0, 1].set_title(semantic_name, fontsize=7)
    if columns == 3:
        axes[0, 2].set_title("proposals, boxes and scores", fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    save_png(figure, path, dpi=72)


def show_outlines(axis, masks: np.ndarray) -> None:
    """The outline of each ground-truth mask (n, y, x) as a thin white contour."""
    for mask in masks:
        if mask.any():
            axis.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)


def truth_outlines(labels: np.ndarray | None, instances: np.ndarray | None) -> np.ndarray | None:
    """The masks whose outlines a figure draws: the objects when the dataset has them, else one mask per
    labelled class; None without ground truth."""
    if instances is not None and len(instances):
        return instances
    if labels is None:
        return None
    return np.stack([labels == c for c in np.unique(labels) if c != IGNORE]) if (labels != IGNORE).any() else None


def save_what_where_figure(path: Path, rgb: np.ndarray, x_orthos: dict[str, np.ndarray], title: str, first: int = 1) -> None:
    """The paper's Figures 8 and 9 for one image: a row per graph kind, the input then every RGB triplet
    of X_ortho's components (from stored component ``first``)."""
    plt = _plt()
    extent = (-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5)
    rows = {graph: eigenvector_panels(x.shape[0], first, panels=x.shape[0]) for graph, x in x_orthos.items()}
    columns = 1 + max(len(panels) for panels in rows.values())
    height = 2.2 * rgb.shape[0] / rgb.shape[1]
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, height * len(rows) + 0.5), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for row, (graph, panels) in zip(axes, rows.items()):
        row[0].imshow(rgb)
        row[0].set_title(f"{graph}: input", fontsize=8)
        for axis, (label, start) in zip(row[1:], panels):
            axis.imshow(eigenvectors_rgb(x_orthos[graph], start), interpolation="nearest", extent=extent)
            axis.set_title(f"{graph}: {label.replace(' as RGB', '')}", fontsize=8)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    save_png(figure, path)


def save_regions_figure(path: Path, views: dict[str, ImageView], outlines: np.ndarray | None, title: str) -> None:
    """A row per graph kind: its K-Means map and its best proposals, with the ground truth's outlines
    (``truth_outlines``) drawn over both when the dataset has them."""
    plt = _plt()
    columns = 2 if any(v.proposals is not None for v in views.values()) else 1
    rgb = next(iter(views.values())).rgb
    height = 3.0 * rgb.shape[0] / rgb.shape[1]
    figure, axes = plt.subplots(len(views), columns, figsize=(3.0 * columns, height * len(views) + 0.5), squeeze=False)
    for row, (graph, view) in zip(axes, views.items()):
        for axis in row:
            axis.axis("off")
        show_semantic(row[0], view)
        row[0].set_title(f"{graph}: K-Means map ({len(np.unique(view.semantic))} regions)", fontsize=8)
        drawn = row[:1]
        if columns == 2 and view.proposals is not None:
            show_proposals(row[1], view)
            row[1].set_title(f"{graph}: proposals (best {min(len(view.proposals), TOP_PROPOSALS)} of {len(view.proposals)})", fontsize=8)
            drawn = row
        for axis in drawn if outlines is not None else ():
            show_outlines(axis, outlines)
    figure.suptitle(title + (" | white: ground-truth outlines" if outlines is not None else ""), fontsize=8)
    figure.tight_layout()
    save_png(figure, path)


R2_FLOOR = -1.0  # a layer's X-Y R² below this (no position at all) is drawn at it, so the others stay readable


def layer_r2_points(rows: list[dict], layers: list[str]) -> np.ndarray:
    """Each layer's own X-Y R² from ``rows`` (read_layers_csv), clipped below at R2_FLOOR; NaN where not stored."""
    position = {row["layer"]: row["layer_xy_r2"] for row in rows if row["layer_xy_r2"] is not None}
    return np.clip(np.array([position.get(layer, np.nan) for layer in layers], dtype=float), R2_FLOOR, None)


def save_layer_figure(path: Path, profiles: dict[str, list[dict]], title: str) -> None:
    """Per graph kind side by side, each head's agreement with the joint eigenvectors (layers down, heads
    across, averaged over the images), then each layer's own X-Y R², a line per graph kind. ``profiles``:
    graph -> rows of ``pipeline.solve.layers.read_layers_csv``."""
    plt = _plt()
    layers = list(dict.fromkeys(row["layer"] for rows in profiles.values() for row in rows))
    heads = list(dict.fromkeys(row["head"] for rows in profiles.values() for row in rows))
    values = [row["agreement"] for rows in profiles.values() for row in rows]
    columns = len(profiles) + 1
    figure, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 1.2 + 0.28 * len(layers)), squeeze=False, layout="constrained")
    for axis, (graph, rows) in zip(axes[0], profiles.items()):
        grid = np.full((len(layers), len(heads)), np.nan)
        for row in rows:
            grid[layers.index(row["layer"]), heads.index(row["head"])] = row["agreement"]
        image = axis.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest", vmin=min(values), vmax=max(values))
        axis.set_title(f"{graph}: agreement " + r"diag($Z^\top A Z$)", fontsize=8)
        axis.set_yticks(range(len(layers)), layers, fontsize=6)
        axis.set_xticks(range(len(heads)), [h.replace("head", "") for h in heads], fontsize=6)
        axis.set_xlabel("head", fontsize=7)
    figure.colorbar(image, ax=list(axes[0, :-1]), fraction=0.04)  # one scale for every graph kind
    axis = axes[0, -1]
    curves = {graph: layer_r2_points(rows, layers) for graph, rows in profiles.items()}
    for graph, points in curves.items():
        axis.plot(points, range(len(layers)), marker="o", label=graph)
    axis.set_yticks(range(len(layers)), layers, fontsize=6)
    axis.invert_yaxis()
    axis.set_xlim(R2_FLOOR - 0.05, 1.05)
    axis.set_title("each layer's own X-Y R²", fontsize=8)
    axis.set_xlabel(f"R² of its own eigenvectors (below {R2_FLOOR:g}: at {R2_FLOOR:g})", fontsize=7)
    if any(np.isfinite(points).any() for points in curves.values()):
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "not computed\n(solve.layer_diagnostics: false)", ha="center", va="center", fontsize=7, transform=axis.transAxes)
    figure.suptitle(title, fontsize=8)
    save_png(figure, path)
