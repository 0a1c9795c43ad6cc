"""A dataset's metrics as a sum over its images: each image scored on its own (one dask task), the
per-image results merged in image order (a fixed-order tree reduction), then turned into scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data.base import IGNORE
from pipeline.metrics import (
    add_confusion, confusion_matrix, instance_ground_truth, matched_scores, oracle_labels, xy_regression,
)


def no_confusion() -> np.ndarray:
    return np.zeros((0, 0), np.int64)


@dataclass
class Totals:
    """What evaluate sums over images: per-image values in image order, confusion matrices added (the
    oracle-decoded regions and the dataset-level clusters), COCO ground truth and detections listed."""

    xy: list[dict[str, float]] = field(default_factory=list)
    matched_miou: list[float] = field(default_factory=list)
    oracle: np.ndarray = field(default_factory=no_confusion)
    semantic: np.ndarray = field(default_factory=no_confusion)
    truth_images: list[dict] = field(default_factory=list)
    truth_objects: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)


def merge_totals(parts: list[Totals]) -> Totals:
    """The totals of consecutive runs of images, in the order given."""
    merged = Totals()
    for part in parts:
        merged.xy += part.xy
        merged.matched_miou += part.matched_miou
        merged.oracle = add_confusion(merged.oracle, part.oracle)
        merged.semantic = add_confusion(merged.semantic, part.semantic)
        merged.truth_images += part.truth_images
        merged.truth_objects += part.truth_objects
        merged.detections += part.detections
    return merged


def image_totals(
    x_ortho: np.ndarray,
    regions: np.ndarray,
    xy_grid: int,
    classes: int = 0,
    truth: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
    objects: tuple[int, np.ndarray, np.ndarray] | None = None,
    proposals: tuple[np.ndarray, np.ndarray] | None = None,
) -> Totals:
    """One image's contribution: X-Y regression of X_ortho (component, y, x); with a label map
    ``truth`` (y, x), the matched mIoU of its ``regions``, the confusion of their oracle decoding
    and, given dataset-level ``clusters``, theirs (``classes``: the dataset's class count, at least);
    with ``objects`` (COCO image id, masks, crowd flags) and ``proposals`` (pixel masks, scores), the
    COCO ground truth and detections."""
    from pipeline.instances import coco_results

    totals = Totals(xy=[xy_regression(x_ortho, xy_grid)])
    labelled = None if truth is None else truth[(truth >= 0) & (truth != IGNORE)]
    if labelled is not None and labelled.size:
        n = max(classes, int(labelled.max()) + 1)
        totals.matched_miou.append(matched_scores(confusion_matrix(truth, regions, n, int(regions.max()) + 1))["miou"])
        totals.oracle = confusion_matrix(truth, oracle_labels(regions, truth), n, n)
        if clusters is not None:
            totals.semantic = confusion_matrix(truth, clusters, n, int(clusters.max()) + 1)
    if objects is not None and proposals is not None:
        image_id, masks, crowd = objects
        image, totals.truth_objects = instance_ground_truth(image_id, masks, crowd)
        totals.truth_images.append(image)
        totals.detections = coco_results(*proposals, image_id)
    return totals
