"""PASCAL VOC 2012 segmentation: ``voc2012:ROOT[:SPLIT]``, class labels from SegmentationClass and
class-agnostic objects from SegmentationObject (255 = object boundaries, ignored).

ROOT is ``VOC2012`` itself, or a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``::

    VOC2012/ImageSets/Segmentation/val.txt      (one image name per line)
    VOC2012/JPEGImages/2007_000033.jpg ...
    VOC2012/SegmentationClass/2007_000033.png ...   (palette PNG: 0 background, 1..20 classes, 255 void)
    VOC2012/SegmentationObject/2007_000033.png ...  (palette PNG: 0 background, 1..N objects, 255 void)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import FileImage, require, require_files, split_root
from pipeline.errors import LdsError

SPLITS = ("val", "train", "trainval")
LAYOUT = "VOC2012/ImageSets/Segmentation/<split>.txt, VOC2012/JPEGImages, VOC2012/SegmentationClass, VOC2012/SegmentationObject"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def find_voc_root(root: Path) -> Path:
    """The VOC2012 folder: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    require(root, "PASCAL VOC root folder", LAYOUT)
    raise LdsError(f"PASCAL VOC 2012 not found: no JPEGImages folder in {root}, {root / 'VOC2012'} or {root / 'VOCdevkit' / 'VOC2012'} (expected layout: {LAYOUT})")


def voc2012(argument: str) -> list[FileImage]:
    """The images of a segmentation split, in the order of its list file."""
    root, split = split_root(argument, SPLITS, "voc2012")
    voc = find_voc_root(root)
    listing = require(voc / "ImageSets" / "Segmentation" / f"{split}.txt", "PASCAL VOC split list", LAYOUT)
    names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise LdsError(f"PASCAL VOC split list {listing} names no images")
    folders = {kind: require(voc / kind, f"PASCAL VOC {kind} folder", LAYOUT) for kind in ("JPEGImages", "SegmentationClass", "SegmentationObject")}
    images = [folders["JPEGImages"] / f"{name}.jpg" for name in names]
    classes = [folders["SegmentationClass"] / f"{name}.png" for name in names]
    objects = [folders["SegmentationObject"] / f"{name}.png" for name in names]
    for paths, what in ((images, "PASCAL VOC image"), (classes, "PASCAL VOC class map"), (objects, "PASCAL VOC object map")):
        require_files(paths, what, LAYOUT)
    return [
        FileImage(name, image, label, obj, image_id=i)
        for i, (name, image, label, obj) in enumerate(zip(names, images, classes, objects))
    ]
