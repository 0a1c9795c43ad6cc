"""What every dataset reader shares: samples, image records, reading files and checking layouts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ItemError, LdsError
from pipeline.store.hashing import canonical_json, sha256_bytes, sha256_file

IGNORE = 255  # label value of pixels that no metric counts (unlabelled, void, object boundaries)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth, at the image's own size."""

    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray | None = None  # (H, W) int32: a class per pixel, IGNORE where unlabelled
    instances: np.ndarray | None = None  # (N, H, W) bool: one class-agnostic object mask each
    crowd: np.ndarray | None = None  # (N,) bool: COCO's iscrowd (a crowd region matches no proposal)


@dataclass(frozen=True)
class FileImage:
    """An image file with optional ground-truth files of the same size.

    ``label_path``: a PNG of label values, mapped through ``label_lut`` (value -> class, IGNORE for
    values the table does not list) when one is given. ``instance_path``: a PNG of object indices
    (0 background, 1..254 objects, IGNORE boundaries), as PASCAL VOC's SegmentationObject.
    """

    id: str
    path: Path
    label_path: Path | None = None
    instance_path: Path | None = None
    label_lut: tuple[int, ...] | None = None
    image_id: int = 0

    def content_hash(self) -> str:
        parts = [_file_hash(p) for p in (self.path, self.label_path, self.instance_path) if p is not None]
        return sha256_bytes(canonical_json([parts, self.label_lut, self.instance_path is not None]).encode())

    def load(self) -> Sample:
        rgb = read_rgb(self.path)
        labels = instances = None
        if self.label_path is not None:
            labels = read_label_png(self.label_path, rgb.shape[:2])
            if self.label_lut is not None:
                labels = apply_lut(labels, self.label_lut)
        if self.instance_path is not None:
            instances = index_masks(read_label_png(self.instance_path, rgb.shape[:2]))
        crowd = None if instances is None else np.zeros(len(instances), dtype=bool)
        return Sample(rgb, labels, instances, crowd)


def apply_lut(raw: np.ndarray, lut: tuple[int, ...]) -> np.ndarray:
    """Label values mapped through a table; values beyond it become IGNORE."""
    table = np.full(max(len(lut), int(raw.max(initial=0)) + 1), IGNORE, dtype=np.int32)
    table[: len(lut)] = lut
    return table[raw]


def index_masks(index: np.ndarray) -> np.ndarray:
    """An index map (0 background, IGNORE boundary, other values objects) -> (N, H, W) bool masks."""
    values = [v for v in np.unique(index) if v not in (0, IGNORE)]
    if not values:
        return np.zeros((0, *index.shape), dtype=bool)
    return np.stack([index == v for v in values])


def safe_id(name: str) -> str:
    """A file stem turned into an item name the store accepts."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-")
    return cleaned or "image"


def unique_ids(names: list[str], where: str) -> list[str]:
    """Item names for these stems; two stems mapping to one name is an error naming both."""
    seen: dict[str, str] = {}
    for name in names:
        item = safe_id(name)
        if item in seen:
            raise LdsError(f"two images in {where} map to the same name {item!r} ({seen[item]}, {name}); rename one of them")
        seen[item] = name
    return list(seen)


def require(path: Path, what: str, layout: str) -> Path:
    """``path`` if it exists, else a one-line error naming it and the layout the reader expects."""
    if not path.exists():
        raise LdsError(f"{what} not found: {path} is missing (expected layout: {layout})")
    return path


def require_files(paths: list[Path], what: str, layout: str) -> None:
    """Every path exists, else one line naming the first missing one and how many are missing."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LdsError(f"{what} not found: {missing[0]} is missing{more} (expected layout: {layout})")


def split_root(argument: str, splits: tuple[str, ...], kind: str) -> tuple[Path, str]:
    """``ROOT`` or ``ROOT:SPLIT`` -> (root, split); the first of ``splits`` is the default."""
    root, _, split = argument.rpartition(":")
    if not root or split not in splits:
        root, split = argument, splits[0]
    if not root:
        raise LdsError(f"dataset {kind}: needs a root folder, as {kind}:ROOT[:SPLIT] with SPLIT one of {', '.join(splits)}")
    return Path(root).expanduser(), split


def _file_hash(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as error:
        raise LdsError(f"cannot read {path}: {error.strerror}") from None


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ItemError(f"cannot read image {path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ItemError(f"cannot read image {path}: not a readable image ({error})") from None


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(open_image(path).convert("RGB"))


def read_label_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A label or index PNG as int32 values (palette images give their indices), checked against the
    image's size."""
    image = open_image(path)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise LdsError(f"label map {path} is a {image.mode} image; expected one channel of label values (L, P or I)")
    values = np.asarray(image).astype(np.int32)
    if values.shape != tuple(shape):
        raise LdsError(f"label map {path} is {values.shape[1]}x{values.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return values
