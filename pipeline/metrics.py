"""Metrics with known answers (METHOD.md section 6)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, n_truth: int, n_pred: int) -> np.ndarray:
    """Counts (truth class, predicted cluster); negative truth labels (ignore) are skipped."""
    keep = truth >= 0
    index = truth[keep].astype(np.int64) * n_pred + prediction[keep].astype(np.int64)
    return np.bincount(index, minlength=n_truth * n_pred).reshape(n_truth, n_pred)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class for a confusion matrix (truth x prediction) whose first columns are the classes;
    any further columns are predictions of no class (always wrong). NaN where absent."""
    classes = confusion.shape[0]
    intersection = np.diag(confusion[:, :classes]).astype(np.float64)
    union = confusion[:, :classes].sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """Column permutation of a (truth x prediction) confusion matrix that maximises the matched pixels:
    ``mapping[cluster] = class`` (-1 for clusters left unmatched)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(confusion.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def aligned_scores(confusion: np.ndarray) -> dict[str, float | list[float | None]]:
    """mIoU, pixel accuracy and per-class IoU of a confusion matrix whose classes correspond (square, or
    with extra trailing columns of predictions that match no class)."""
    ious = iou_per_class(confusion)
    return {
        "miou": float(np.nanmean(ious)),
        "pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "iou_per_class": [None if np.isnan(v) else float(v) for v in ious],
    }


def matched_scores(confusion: np.ndarray) -> dict[str, float | list[float | None]]:
    """``aligned_scores`` after Hungarian matching of clusters (columns) to classes (rows)."""
    mapping = hungarian_match(confusion)
    classes = confusion.shape[0]
    # the last column gathers clusters matched to no class: their pixels count as misclassified
    matched = np.zeros((classes, classes + 1), dtype=np.int64)
    for cluster, cls in enumerate(mapping):
        matched[:, cls if cls >= 0 else classes] += confusion[:, cluster]
    return aligned_scores(matched)


def oracle_labels(regions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each region takes the ground-truth label it overlaps most (region quality by oracle decoding)."""
    out = np.full_like(truth, -1)
    for region in np.unique(regions):
        mask = regions == region
        values = truth[mask]
        values = values[values >= 0]
        if values.size:
            out[mask] = np.bincount(values).argmax()
    return out


def xy_regression_r2(features: np.ndarray, seed: int = 0, train_fraction: float = 0.8) -> float:
    """R² of a linear regression from token features (component, y, x) to token coordinates,
    trained on a random 80% of the tokens and scored on the other 20%."""
    from sklearn.linear_model import LinearRegression

    components, height, width = features.shape
    inputs = features.reshape(components, -1).T
    yy, xx = np.mgrid[:height, :width]
    targets = np.stack([yy.ravel() / max(height - 1, 1), xx.ravel() / max(width - 1, 1)], axis=1)
    order = np.random.default_rng(seed).permutation(len(inputs))
    cut = int(round(train_fraction * len(inputs)))
    train, test = order[:cut], order[cut:]
    model = LinearRegression().fit(inputs[train], targets[train])
    return float(model.score(inputs[test], targets[test]))
