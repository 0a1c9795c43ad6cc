"""Image resizing as the method prescribes (METHOD.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.base import IGNORE
from pipeline.settings import setting

MODES = ("short-side", "center-crop")


@dataclass(frozen=True)
class PreprocessParams:
    """`lds preprocess` (METHOD.md section 4); the workflow passes the model's own size and patch."""

    size: int = setting(224, minimum=16, config=False, help="Short side in pixels.")
    mode: str = setting("short-side", choices=MODES, help="short-side: aspect kept; center-crop: a centre square (dataset-level protocol).")
    multiple: int = setting(16, minimum=1, config=False, help="Crop sides to a multiple (patch size).")


def target_size(height: int, width: int, size: int, mode: str, multiple: int) -> tuple[int, int]:
    """(height, width) after resizing, before cropping to a multiple of the patch size."""
    scale = size / min(height, width)
    return max(multiple, round(height * scale)), max(multiple, round(width * scale))


@dataclass(frozen=True)
class Geometry:
    """How an image of size ``original`` became the preprocessed one: resized to ``resized``, then
    cropped to ``size`` at (``top``, ``left``). Sizes are (height, width)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]

    def as_dict(self) -> dict[str, list[int]]:
        return {"original_size": list(self.original), "resized_size": list(self.resized),
                "crop": [self.top, self.left, *self.size]}

    @classmethod
    def from_dict(cls, attrs: dict) -> "Geometry":
        top, left, height, width = attrs["crop"]
        return cls(tuple(attrs["original_size"]), tuple(attrs["resized_size"]), top, left, (height, width))


def plan(height: int, width: int, size: int, mode: str = "short-side", multiple: int = 16) -> Geometry:
    """The geometry of ``resize_image`` for an image of (height, width)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    resized_h, resized_w = target_size(height, width, size, mode, multiple)
    if mode == "center-crop":
        crop_h = crop_w = size - size % multiple
    else:
        crop_h, crop_w = resized_h - resized_h % multiple, resized_w - resized_w % multiple
    return Geometry((height, width), (resized_h, resized_w), (resized_h - crop_h) // 2, (resized_w - crop_w) // 2, (crop_h, crop_w))


def _crop(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    height, width = geometry.size
    return array[geometry.top : geometry.top + height, geometry.left : geometry.left + width]


def resize_nearest(values: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label map or mask (y, x) resized with nearest neighbour and cropped like its image."""
    image = Image.fromarray(values.astype(np.int32), mode="I")
    resized = np.asarray(image.resize(geometry.resized[::-1], Image.Resampling.NEAREST))
    return _crop(resized, geometry).astype(values.dtype)


def to_original(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A preprocessed-image mask back on the original image (nearest); pixels cropped away are False."""
    canvas = np.zeros(geometry.resized, dtype=np.uint8)
    height, width = geometry.size
    canvas[geometry.top : geometry.top + height, geometry.left : geometry.left + width] = mask
    original = Image.fromarray(canvas).resize(geometry.original[::-1], Image.Resampling.NEAREST)
    return np.asarray(original).astype(bool)


def resize_image(
    rgb: np.ndarray, labels: np.ndarray | None, size: int, mode: str = "short-side", multiple: int = 16
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an RGB image (bicubic) and its label map (nearest).

    ``short-side``: short side to ``size``, aspect kept, then centre-cropped so both sides are
    multiples of ``multiple`` (the patch size). ``center-crop``: minor edge to ``size`` and a centre
    square crop (the dataset-level PiCIE / STEGO protocol).
    """
    geometry = plan(rgb.shape[0], rgb.shape[1], size, mode, multiple)
    resized = _crop(np.asarray(Image.fromarray(rgb).resize(geometry.resized[::-1], Image.Resampling.BICUBIC)), geometry)
    return resized, None if labels is None else resize_nearest(labels.astype(np.int32), geometry)


def preprocess_sample(sample, params: PreprocessParams) -> tuple[dict, dict]:
    """One loaded sample (image, label map, objects) resized as ``params`` say -> (arrays, attributes):
    ``rgb``, ``labels`` and ``instances`` / ``instance_crowd`` where the dataset has them, and the geometry
    that maps the result back to the original image."""
    from pipeline.store import ArraySpec

    height, width = sample.rgb.shape[:2]
    geometry = plan(height, width, params.size, params.mode, params.multiple)
    resized, labels = resize_image(sample.rgb, sample.labels, params.size, params.mode, params.multiple)
    arrays = {"rgb": ArraySpec(resized, ("y", "x", "channel"), {"description": "resized RGB image"})}
    if labels is not None:
        arrays["labels"] = ArraySpec(labels, ("y", "x"), {"description": f"ground-truth class per pixel ({IGNORE} = ignore)"})
    if sample.instances is not None:
        masks = [resize_nearest(mask, geometry) for mask in sample.instances]
        kept = [i for i, mask in enumerate(masks) if mask.any()]  # objects too small to survive resizing
        stacked = np.stack([masks[i] for i in kept]) if kept else np.zeros((0, *geometry.size), dtype=bool)
        chunk = max(len(kept), 1)
        arrays["instances"] = ArraySpec(stacked, ("instance", "y", "x"), {"description": "ground-truth object masks (class-agnostic)"}, chunks=(chunk, *geometry.size))
        arrays["instance_crowd"] = ArraySpec(sample.crowd[kept], ("instance",), {"description": "COCO iscrowd flag per object"}, chunks=(chunk,))
    return arrays, geometry.as_dict()
