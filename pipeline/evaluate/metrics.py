"""Metrics with known answers (METHOD.md section 6)."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from pipeline.data.base import IGNORE


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, n_truth: int, n_pred: int) -> np.ndarray:
    """Counts (truth class, predicted cluster); truth labels that are negative or IGNORE are skipped."""
    keep = (truth >= 0) & (truth != IGNORE)
    index = truth[keep].astype(np.int64) * n_pred + prediction[keep].astype(np.int64)
    return np.bincount(index, minlength=n_truth * n_pred).reshape(n_truth, n_pred)


def add_confusion(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Sum of two confusion matrices of possibly different shapes (the smaller padded with zeros)."""
    rows, cols = max(total.shape[0], part.shape[0]), max(total.shape[1], part.shape[1])
    summed = np.zeros((rows, cols), dtype=np.int64)
    summed[: total.shape[0], : total.shape[1]] += total
    summed[: part.shape[0], : part.shape[1]] += part
    return summed


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
    """``aligned_scores`` after Hungarian matching of clusters (columns) to the classes (rows) present
    in the ground truth; classes without a pixel get no cluster and no IoU (None)."""
    present = np.flatnonzero(confusion.sum(1) > 0)
    mapping = hungarian_match(confusion[present])
    classes = confusion.shape[0]
    # the last column gathers clusters matched to no class: their pixels count as misclassified
    matched = np.zeros((classes, classes + 1), dtype=np.int64)
    for cluster, row in enumerate(mapping):
        matched[:, present[row] if row >= 0 else classes] += confusion[:, cluster]
    return aligned_scores(matched)


def oracle_labels(regions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each region takes the ground-truth label it overlaps most (region quality by oracle decoding);
    regions without a labelled pixel are IGNORE."""
    out = np.full_like(truth, IGNORE)
    for region in np.unique(regions):
        mask = regions == region
        values = truth[mask]
        values = values[(values >= 0) & (values != IGNORE)]
        if values.size:
            out[mask] = np.bincount(values).argmax()
    return out


def bilinear_grid(features: np.ndarray, grid: int) -> np.ndarray:
    """Features (component, y, x) sampled bilinearly on a grid x grid lattice spanning the token centres
    from the first to the last (corners aligned: a linear function of position stays linear)."""
    from scipy.ndimage import map_coordinates

    _, height, width = features.shape
    yy, xx = np.meshgrid(np.linspace(0, height - 1, grid), np.linspace(0, width - 1, grid), indexing="ij")
    return np.stack([map_coordinates(channel.astype(np.float64), [yy, xx], order=1) for channel in features])


def xy_regression(features: np.ndarray, grid: int = 32, seed: int = 0, train_fraction: float = 0.8) -> dict[str, float]:
    """How well position can be read linearly from the features (component, y, x): features resampled to
    a grid x grid lattice, a linear regression to the (y, x) of each cell (in [0, 1]) fitted on a random
    80% of the cells and scored on the other 20%: ``r2`` (R² over both coordinates) and ``error`` (mean
    distance between predicted and true position, as a fraction of the image side)."""
    from sklearn.linear_model import LinearRegression

    sampled = bilinear_grid(features, grid)
    inputs = sampled.reshape(sampled.shape[0], -1).T
    yy, xx = np.mgrid[:grid, :grid] / max(grid - 1, 1)
    targets = np.stack([yy.ravel(), xx.ravel()], axis=1)
    order = np.random.default_rng(seed).permutation(len(inputs))
    cut = int(round(train_fraction * len(inputs)))
    train, test = order[:cut], order[cut:]
    model = LinearRegression().fit(inputs[train], targets[train])
    predicted = model.predict(inputs[test])
    return {
        "r2": float(model.score(inputs[test], targets[test])),
        "error": float(np.linalg.norm(predicted - targets[test], axis=1).mean()),
    }


def instance_ground_truth(image_id: int, masks: np.ndarray, crowd: np.ndarray) -> tuple[dict, list[dict]]:
    """A COCO image record and class-agnostic annotations (category 1) for object masks (n, y, x)."""
    from pipeline.data.coco import encode_mask

    image = {"id": int(image_id), "height": int(masks.shape[1]), "width": int(masks.shape[2])}
    annotations = []
    for mask, is_crowd in zip(masks, crowd):
        rle, box = encode_mask(mask)
        annotations.append({
            "image_id": int(image_id), "category_id": 1, "segmentation": rle, "area": float(mask.sum()),
            "bbox": box, "iscrowd": int(is_crowd),
        })
    return image, annotations


COCO_STATS = {"ap": 0, "ap50": 1, "ar100": 8}  # indices into COCOeval.stats


def coco_evaluate(images: list[dict], annotations: list[dict], results: list[dict]) -> dict[str, dict[str, float]]:
    """Class-agnostic COCOeval (``useCats = 0``) of results (COCO results json records) against ground
    truth (image records with id, height, width; annotations of category 1, renumbered), for boxes
    (``bbox``) and masks (``segm``): AP (IoU .50:.95), AP50 and AR100 each."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def index(records: list[dict]) -> COCO:
        coco = COCO()
        coco.dataset = {"images": images, "annotations": records, "categories": [{"id": 1, "name": "object"}]}
        coco.createIndex()
        return coco

    with contextlib.redirect_stdout(io.StringIO()):
        truth = index([{**annotation, "id": i} for i, annotation in enumerate(annotations, 1)])
        # loadRes fills in what COCOeval needs (ids, areas) but refuses an empty list
        detections = truth.loadRes([dict(r) for r in results]) if results else index([])
        scores = {}
        for kind in ("bbox", "segm"):
            evaluation = COCOeval(truth, detections, kind)
            evaluation.params.useCats = 0
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            scores[kind] = {name: float(evaluation.stats[i]) for name, i in COCO_STATS.items()}
    return scores
