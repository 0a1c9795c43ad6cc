"""Datasets: named specs that list image records, each loadable (image and ground truth) and hashed.

One module per layout; a spec is ``KIND`` or ``KIND:ARGUMENT``:

- ``skimage-samples``: six photographs that ship with scikit-image (no download).
- ``folder:PATH``: every image file in a folder (sorted by name, not recursive).
- ``glob:PATTERN``: image files matching a glob pattern (``**`` recurses).
- ``synthetic-shapes:N``: N generated images with label maps and objects (tests and metric checks).
- ``coco:ROOT[:SPLIT]``: COCO 2017 instances, class-agnostic object masks (``pipeline.data.coco``).
- ``coco-stuff27:ROOT[:SPLIT]``: COCO-Stuff, 182 classes mapped to 27.
- ``cityscapes27:ROOT[:SPLIT]``: Cityscapes gtFine label ids mapped to 27 classes.
- ``voc2012:ROOT[:SPLIT]``: PASCAL VOC 2012, SegmentationClass and SegmentationObject.

Label maps hold class indices with ``IGNORE`` (255) for pixels no metric counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.base import IGNORE, FileImage, Sample, safe_id
from pipeline.data.cityscapes import CITYSCAPES_27, cityscapes27
from pipeline.data.coco import COCO_STUFF_27, CocoImage, coco_instances, coco_stuff27
from pipeline.data.folder import folder_images, glob_images, skimage_samples
from pipeline.data.synthetic import CLASSES as SHAPE_CLASSES, SyntheticImage, synthetic_shapes
from pipeline.data.voc import VOC_CLASSES, voc2012
from pipeline.errors import LdsError

ImageRecord = FileImage | SyntheticImage | CocoImage

__all__ = [
    "IGNORE", "Dataset", "FileImage", "CocoImage", "ImageRecord", "Sample", "SyntheticImage",
    "list_images", "num_shards", "open_dataset", "safe_id", "shard",
]


@dataclass(frozen=True)
class Dataset:
    """A dataset's records, the names of its label classes (None: no class labels) and whether it has
    object (instance) ground truth."""

    spec: str
    records: list[ImageRecord]
    classes: tuple[str, ...] | None = None
    instances: bool = False


@dataclass(frozen=True)
class Reader:
    read: Callable[[str], list[ImageRecord] | None]  # None: the argument is not of this reader's form
    usage: str
    needs_argument: bool = True
    classes: tuple[str, ...] | None = None
    instances: bool = False


READERS: dict[str, Reader] = {
    "skimage-samples": Reader(lambda argument: None if argument else skimage_samples(), "skimage-samples", needs_argument=False),
    "folder": Reader(lambda argument: folder_images(Path(argument).expanduser()), "folder:PATH"),
    "glob": Reader(glob_images, "glob:PATTERN"),
    "synthetic-shapes": Reader(synthetic_shapes, "synthetic-shapes:N", needs_argument=False, classes=SHAPE_CLASSES, instances=True),
    "coco": Reader(coco_instances, "coco:ROOT[:SPLIT]", instances=True),
    "coco-stuff27": Reader(coco_stuff27, "coco-stuff27:ROOT[:SPLIT]", classes=COCO_STUFF_27),
    "cityscapes27": Reader(cityscapes27, "cityscapes27:ROOT[:SPLIT]", classes=CITYSCAPES_27),
    "voc2012": Reader(voc2012, "voc2012:ROOT[:SPLIT]", classes=VOC_CLASSES, instances=True),
}


def open_dataset(spec: str) -> Dataset:
    """The dataset a spec names: its records in a fixed order, its classes, whether it has objects."""
    kind, _, argument = spec.partition(":")
    reader = READERS.get(kind)
    records = reader.read(argument) if reader and (argument or not reader.needs_argument) else None
    if records is None:
        usages = ", ".join(r.usage for r in READERS.values())
        raise LdsError(f"unknown dataset {spec!r}; use one of {usages}")
    return Dataset(spec, records, reader.classes, reader.instances)


def list_images(spec: str) -> list[ImageRecord]:
    """The records of a dataset spec, in a fixed order."""
    return open_dataset(spec).records


def shard(records: list[ImageRecord], index: int, size: int) -> list[ImageRecord]:
    """Records ``[index * size, (index + 1) * size)``: shards are contiguous runs of the listing."""
    if size < 1 or index < 0:
        raise LdsError(f"bad shard {index} of size {size}: both must be >= 0 and size >= 1")
    selected = records[index * size : (index + 1) * size]
    if not selected:
        raise LdsError(f"shard {index} is empty: the dataset has {len(records)} images, {size} per shard")
    return selected


def num_shards(count: int, size: int) -> int:
    return max(1, -(-count // size))
