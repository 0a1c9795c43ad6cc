"""Datasets: named specs that list image records, each loadable and content-hashed.

Specs:
- ``skimage-samples``: real photographs that ship with scikit-image (no download).
- ``folder:PATH``: every image file in a folder (sorted by name, not recursive).
- ``synthetic-shapes:N``: N generated images with known label maps (for tests and metric checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import LdsError
from pipeline.hashing import sha256_bytes, sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SKIMAGE_SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


@dataclass(frozen=True)
class FileImage:
    """An image file on disk, with an optional label map (an integer PNG of the same size)."""

    id: str
    path: Path
    label_path: Path | None = None

    def content_hash(self) -> str:
        try:
            return sha256_file(self.path)
        except OSError as error:
            raise LdsError(f"cannot read image {self.path}: {error.strerror}") from None

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (H, W, 3) and the label map (H, W) or None."""
        rgb = _read_rgb(self.path)
        labels = None
        if self.label_path is not None:
            labels = np.asarray(_open_image(self.label_path)).astype(np.int32)
        return rgb, labels


@dataclass(frozen=True)
class SyntheticImage:
    """A generated image: coloured rectangles and discs on a textured background, with labels.

    Label 0 is the background; each shape has the label of its colour class (1..3).
    """

    id: str
    index: int
    size: int = 96

    def content_hash(self) -> str:
        rgb, labels = self.load()
        return sha256_bytes(rgb.tobytes() + labels.tobytes())

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.index)
        size = self.size
        palette = np.array([[70, 110, 60], [220, 40, 40], [40, 60, 220], [240, 210, 40]], dtype=np.float64)
        labels = np.zeros((size, size), dtype=np.int32)
        yy, xx = np.mgrid[:size, :size]
        for shape_class in rng.permutation([1, 2, 3]):
            cy, cx = rng.integers(size // 5, size - size // 5, 2)
            radius = rng.integers(size // 8, size // 4)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            else:
                mask = (abs(yy - cy) < radius) & (abs(xx - cx) < radius)
            labels[mask] = shape_class
        rgb = palette[labels] + rng.normal(0, 12, (size, size, 3))
        return np.clip(rgb, 0, 255).astype(np.uint8), labels


ImageRecord = FileImage | SyntheticImage


def list_images(spec: str) -> list[ImageRecord]:
    """The records of a dataset spec, in a fixed order."""
    kind, _, argument = spec.partition(":")
    if kind == "skimage-samples" and not argument:
        return _skimage_samples()
    if kind == "folder" and argument:
        return _folder(Path(argument).expanduser())
    if kind == "synthetic-shapes" and (not argument or (argument.isdigit() and int(argument) > 0)):
        count = int(argument) if argument else 8
        return [SyntheticImage(f"shapes-{i:04d}", i) for i in range(count)]
    raise LdsError(
        f"unknown dataset {spec!r}; use skimage-samples, folder:PATH or synthetic-shapes:N"
    )


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


def safe_id(name: str) -> str:
    """A file stem turned into an item name the store accepts."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-")
    return cleaned or "image"


def _skimage_samples() -> list[ImageRecord]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [FileImage(Path(name).stem, folder / name) for name in SKIMAGE_SAMPLES]


def _folder(folder: Path) -> list[ImageRecord]:
    if not folder.is_dir():
        raise LdsError(f"dataset folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise LdsError(f"dataset folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    records, seen = [], set()
    for path in files:
        item = safe_id(path.stem)
        if item in seen:
            raise LdsError(f"two images in {folder} map to the same name {item!r}; rename one of them")
        seen.add(item)
        records.append(FileImage(item, path))
    return records


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise LdsError(f"cannot read image {path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise LdsError(f"cannot read image {path}: not a readable image ({error})") from None


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(_open_image(path).convert("RGB"))
