"""Cityscapes: ``cityscapes27:ROOT[:SPLIT]``, gtFine label ids mapped to the 27 classes of the
unsupervised segmentation protocol (PiCIE, STEGO: label ids 7..33, everything else ignored).

Layout (the official leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, unpacked into ROOT)::

    ROOT/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png ...
    ROOT/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png ...
"""

from __future__ import annotations

from pipeline.data.base import IGNORE, FileImage, require, require_files, split_root
from pipeline.errors import LdsError

SPLITS = ("val", "train", "test")
LAYOUT = "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png"
FIRST_LABEL_ID = 7  # 'road'; ids 0..6 (unlabeled, ego vehicle, ..., ground) are void
CITYSCAPES_27 = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
LABEL_ID_TO_27 = (IGNORE,) * FIRST_LABEL_ID + tuple(range(len(CITYSCAPES_27)))
SUFFIX = "_leftImg8bit.png"


def cityscapes27(argument: str) -> list[FileImage]:
    """Every image of a split (sorted by city and name) with its gtFine labels mapped to 27 classes."""
    root, split = split_root(argument, SPLITS, "cityscapes27")
    require(root, "Cityscapes root folder", LAYOUT)
    images = require(root / "leftImg8bit" / split, "Cityscapes image folder", LAYOUT)
    labels = require(root / "gtFine" / split, "Cityscapes gtFine folder", LAYOUT)
    paths = sorted(images.glob(f"*/*{SUFFIX}"))
    if not paths:
        raise LdsError(f"Cityscapes image folder {images} holds no */*{SUFFIX} images (expected layout: {LAYOUT})")
    names = [p.name[: -len(SUFFIX)] for p in paths]
    label_paths = [labels / p.parent.name / f"{name}_gtFine_labelIds.png" for p, name in zip(paths, names)]
    require_files(label_paths, "Cityscapes label map", LAYOUT)
    return [
        FileImage(name, path, label, label_lut=LABEL_ID_TO_27, image_id=i)
        for i, (name, path, label) in enumerate(zip(names, paths, label_paths))
    ]
