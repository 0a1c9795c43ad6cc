"""COCO 2017: ``coco:ROOT[:SPLIT]`` (instances, class-agnostic) and ``coco-stuff27:ROOT[:SPLIT]``.

COCO instances (the layout of the official download)::

    ROOT/annotations/instances_val2017.json
    ROOT/val2017/000000000139.jpg ...

COCO-Stuff (the layout of the cocostuff repository: stuffthingmaps_trainval2017.zip unpacked into
annotations/), with the curated image list of the 27-class protocol (IIC, PiCIE, STEGO) used when present::

    ROOT/images/val2017/000000000139.jpg ...
    ROOT/annotations/val2017/000000000139.png ...     (0..181 = COCO category id - 1, 255 unlabelled)
    ROOT/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt   (optional: one image stem per line)
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.base import FileImage, Sample, read_rgb, require, require_files, split_root
from pipeline.errors import ItemError, LdsError
from pipeline.store.hashing import canonical_json, sha256_bytes, sha256_file

SPLITS = ("val2017", "train2017")
INSTANCES_LAYOUT = "ROOT/annotations/instances_<split>.json and ROOT/<split>/*.jpg"
STUFF_LAYOUT = "ROOT/images/<split>/*.jpg and ROOT/annotations/<split>/*.png (stuffthingmaps)"
CURATED = "Coco164kFull_Stuff_Coarse_7.txt"

# COCO-Stuff's 182 fine classes (category id - 1) -> the 27 coarse classes of the unsupervised
# segmentation protocol (IIC, PiCIE, STEGO): 12 thing supercategories, then 15 stuff ones.
FINE_TO_COARSE_27 = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 0-24
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5,  # 25-50
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0,  # 51-76
    1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12,  # 77-102
    17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24,  # 103-126
    20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,  # 127-150
    17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,  # 151-174
    18, 18, 26, 26, 19, 19, 24,  # 175-181
)
COCO_STUFF_27 = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "raw-material", "textile", "wall", "window", "building", "ground", "plant", "sky",
    "solid", "structural", "water",
)


def encode_mask(mask: np.ndarray) -> tuple[dict, list[float]]:
    """A binary mask (y, x) as COCO json spells it: compressed RLE (counts as text) and its box
    [x, y, width, height]."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    box = mask_utils.toBbox(rle).tolist()
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, box


def load_coco(path: str):
    """A pycocotools COCO index of an annotation file (cached while the file is unchanged: it can be large)."""
    stat = Path(path).stat()
    return _load_coco(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_coco(path: str, mtime_ns: int, size: int):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        raise LdsError(f"COCO annotation file {path} is not a COCO instances json ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class CocoImage:
    """A COCO image and its instance annotations (class-agnostic masks; crowd regions flagged)."""

    id: str
    path: Path
    annotations: Path
    image_id: int

    def _anns(self) -> list[dict]:
        coco = load_coco(str(self.annotations))
        return sorted(coco.imgToAnns.get(self.image_id, []), key=lambda ann: ann["id"])

    def content_hash(self) -> str:
        try:
            image = sha256_file(self.path)
        except OSError as error:
            raise ItemError(f"cannot read image {self.path}: {error.strerror}") from None
        return sha256_bytes(canonical_json([image, "coco-instances", self._anns()]).encode())

    def load(self) -> Sample:
        rgb = read_rgb(self.path)
        coco = load_coco(str(self.annotations))
        anns = self._anns()
        shape = rgb.shape[:2]
        info = coco.imgs[self.image_id]
        if (info["height"], info["width"]) != shape:
            raise LdsError(f"image {self.path} is {shape[1]}x{shape[0]} but {self.annotations} says {info['width']}x{info['height']}")
        masks = np.zeros((len(anns), *shape), dtype=bool)
        for i, ann in enumerate(anns):
            masks[i] = coco.annToMask(ann).astype(bool)
        crowd = np.array([bool(ann.get("iscrowd", 0)) for ann in anns], dtype=bool)
        return Sample(rgb, None, masks, crowd)


def coco_instances(argument: str) -> list[CocoImage]:
    """The images of a COCO split listed in its instances json, sorted by file name."""
    root, split = split_root(argument, SPLITS, "coco")
    require(root, "COCO root folder", INSTANCES_LAYOUT)
    annotations = require(root / "annotations" / f"instances_{split}.json", "COCO annotations", INSTANCES_LAYOUT)
    folder = require(root / split, "COCO image folder", INSTANCES_LAYOUT)
    coco = load_coco(str(annotations))
    images = sorted(coco.imgs.values(), key=lambda info: info["file_name"])
    if not images:
        raise LdsError(f"COCO annotations {annotations} list no images")
    paths = [folder / info["file_name"] for info in images]
    require_files(paths, "COCO image", INSTANCES_LAYOUT)
    return [CocoImage(Path(info["file_name"]).stem, path, annotations, int(info["id"])) for info, path in zip(images, paths)]


def coco_stuff27(argument: str) -> list[FileImage]:
    """COCO-Stuff images with their stuffthingmaps mapped to 27 classes (the curated list when present)."""
    root, split = split_root(argument, SPLITS, "coco-stuff27")
    require(root, "COCO-Stuff root folder", STUFF_LAYOUT)
    images = require(root / "images" / split, "COCO-Stuff image folder", STUFF_LAYOUT)
    labels = require(root / "annotations" / split, "COCO-Stuff label folder", STUFF_LAYOUT)
    curated = root / "curated" / split / CURATED
    if curated.is_file():
        stems = [line.strip() for line in curated.read_text().splitlines() if line.strip()]
    else:
        stems = sorted(p.stem for p in images.glob("*.jpg"))
    if not stems:
        raise LdsError(f"COCO-Stuff image folder {images} holds no .jpg images (expected layout: {STUFF_LAYOUT})")
    image_paths = [images / f"{stem}.jpg" for stem in stems]
    label_paths = [labels / f"{stem}.png" for stem in stems]
    require_files(image_paths, "COCO-Stuff image", STUFF_LAYOUT)
    require_files(label_paths, "COCO-Stuff label map", STUFF_LAYOUT)
    return [
        FileImage(stem, image, label, label_lut=FINE_TO_COARSE_27, image_id=_coco_id(stem, i))
        for i, (stem, image, label) in enumerate(zip(stems, image_paths, label_paths))
    ]


def _coco_id(stem: str, index: int) -> int:
    """COCO's image id (the number in the file name), else the position in the listing."""
    return int(stem) if stem.isdigit() else index

