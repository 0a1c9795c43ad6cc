"""A dataset's metrics as a sum over its images: each image scored on its own (one dask task), the
per-image results merged in image order (a fixed-order tree reduction), then turned into scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data import ImageRecord, open_dataset
from pipeline.data.base import IGNORE
from pipeline.data.coco import CocoImage, load_coco
from pipeline.errors import LdsError
from pipeline.evaluate.metrics import (
    add_confusion, confusion_matrix, instance_ground_truth, matched_scores, oracle_labels, xy_regression,
)
from pipeline.data.preprocess import Geometry, to_original


def no_confusion() -> np.ndarray:
    return np.zeros((0, 0), np.int64)


@dataclass
class Totals:
    """What evaluate sums over images: per-image values in image order (``matched_miou`` None for an
    image without labels), confusion matrices added (the oracle-decoded regions and the dataset-level
    clusters), COCO ground truth and detections listed."""

    xy: list[dict[str, float]] = field(default_factory=list)
    matched_miou: list[float | None] = field(default_factory=list)
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
    objects: tuple[dict, list[dict]] | None = None,
    detections: list[dict] | None = None,
) -> Totals:
    """One image's contribution: X-Y regression of X_ortho (component, y, x); with a label map
    ``truth`` (y, x), the matched mIoU of its ``regions``, the confusion of their oracle decoding
    and, given dataset-level ``clusters``, theirs (``classes``: the dataset's class count, at least);
    with ``objects`` (a COCO image record and its annotations) and ``detections`` (COCO results on the
    same image), both listed for COCOeval."""
    totals = Totals(xy=[xy_regression(x_ortho, xy_grid)], matched_miou=[None])
    labelled = None if truth is None else truth[(truth >= 0) & (truth != IGNORE)]
    if labelled is not None and labelled.size:
        n = max(classes, int(labelled.max()) + 1)
        totals.matched_miou = [matched_scores(confusion_matrix(truth, regions, n, int(regions.max()) + 1))["miou"]]
        totals.oracle = confusion_matrix(truth, oracle_labels(regions, truth), n, n)
        if clusters is not None:
            totals.semantic = confusion_matrix(truth, clusters, n, int(clusters.max()) + 1)
    if objects is not None and detections is not None:
        image, totals.truth_objects = objects
        totals.truth_images.append(image)
        totals.detections = detections
    return totals


# ------------------------------------------------------- instances at the original image resolution


class DatasetUnreachable(LdsError):
    """The dataset a preprocess artifact was made from cannot be read any more (or was never named)."""


def dataset_records(spec: str | None, image_ids: dict[str, int | None]) -> dict[str, ImageRecord]:
    """The records of dataset ``spec`` for the preprocessed items (name -> image id), read afresh for
    their ground truth at original size. DatasetUnreachable when the reader cannot list the dataset (its
    one line names the missing file); one line when it no longer lists an item with the same image id."""
    if spec is None:
        raise DatasetUnreachable("the preprocess artifact names no dataset")
    try:
        records = {record.id: record for record in open_dataset(spec).records}
    except LdsError as error:
        raise DatasetUnreachable(str(error)) from None
    for item, image_id in image_ids.items():
        if item not in records or records[item].image_id != image_id:
            raise LdsError(f"dataset {spec} no longer lists image {item} with image id {image_id} as preprocessed; re-run lds preprocess")
    return {item: records[item] for item in image_ids}


def instance_protocol(records: list[ImageRecord], spec: str | None) -> str:
    """How the instance metrics were scored, for metrics.json."""
    jsons = sorted({str(r.annotations) for r in records if isinstance(r, CocoImage)})
    if jsons:
        return f"original resolution, annotations from {', '.join(jsons)}"
    return f"original resolution, object masks of {spec} as RLE"


def original_truth(record: ImageRecord, geometry: Geometry) -> tuple[dict, list[dict]]:
    """An image's objects at its original size as a COCO image record and class-agnostic annotations
    (category 1): for a COCO image the instances json's own (polygons, RLE, iscrowd and area as in the
    file), else the reader's object masks encoded as RLE. One line when the size is not the one
    preprocessed."""
    if isinstance(record, CocoImage):
        coco = load_coco(str(record.annotations))
        info = coco.imgs[record.image_id]
        image = {"id": record.image_id, "height": int(info["height"]), "width": int(info["width"])}
        annotations = [{**ann, "category_id": 1} for ann in coco.imgToAnns.get(record.image_id, [])]
        where = str(record.annotations)
    else:
        sample = record.load()
        image, annotations = instance_ground_truth(record.image_id, sample.instances, sample.crowd)
        where = str(getattr(record, "path", record.id))
    size = (image["height"], image["width"])
    if size != tuple(geometry.original):
        raise LdsError(f"image {record.id} is {size[1]}x{size[0]} in {where} but was preprocessed from {geometry.original[1]}x{geometry.original[0]}; re-run lds preprocess")
    return image, annotations


def original_detections(token_masks: np.ndarray, scores: np.ndarray, geometry: Geometry, image_id: int) -> list[dict]:
    """Proposals (n, y, x on the token grid) as COCO results on the original image: upsampled to the
    preprocessed size (``pixel_masks``), then the crop and resize undone (``to_original``)."""
    from pipeline.decode.instances import pixel_masks

    masks = [to_original(m, geometry) for m in pixel_masks(token_masks, geometry.size)]
    return _coco_results(masks, scores, geometry.original, image_id)


def preprocessed_detections(token_masks: np.ndarray, scores: np.ndarray, size: tuple[int, int], image_id: int) -> list[dict]:
    """Proposals (n, y, x on the token grid) as COCO results on the preprocessed image of ``size``
    (``pixel_masks``): the fallback when the dataset is unreachable."""
    from pipeline.decode.instances import pixel_masks

    return _coco_results(list(pixel_masks(token_masks, size)), scores, size, image_id)


def _coco_results(masks: list[np.ndarray], scores: np.ndarray, size: tuple[int, int], image_id: int) -> list[dict]:
    from pipeline.decode.instances import coco_results

    return coco_results(np.stack(masks) if masks else np.zeros((0, *size), bool), scores, image_id)
