"""Image resizing as the method prescribes (METHOD.md section 4)."""

from __future__ import annotations

import numpy as np
from PIL import Image

MODES = ("short-side", "center-crop")


def target_size(height: int, width: int, size: int, mode: str, multiple: int) -> tuple[int, int]:
    """(height, width) after resizing, before cropping to a multiple of the patch size."""
    scale = size / min(height, width)
    return max(multiple, round(height * scale)), max(multiple, round(width * scale))


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (array.shape[0] - height) // 2
    left = (array.shape[1] - width) // 2
    return array[top : top + height, left : left + width]


def resize_image(
    rgb: np.ndarray, labels: np.ndarray | None, size: int, mode: str = "short-side", multiple: int = 16
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an RGB image (bicubic) and its label map (nearest).

    ``short-side``: short side to ``size``, aspect kept, then centre-cropped so both sides are
    multiples of ``multiple`` (the patch size). ``center-crop``: minor edge to ``size`` and a centre
    square crop (the dataset-level PiCIE / STEGO protocol).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    height, width = target_size(rgb.shape[0], rgb.shape[1], size, mode, multiple)
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))
    resized_labels = None
    if labels is not None:
        label_image = Image.fromarray(labels.astype(np.int32), mode="I")
        resized_labels = np.asarray(label_image.resize((width, height), Image.Resampling.NEAREST))
    if mode == "center-crop":
        crop_h = crop_w = size - size % multiple
    else:
        crop_h, crop_w = height - height % multiple, width - width % multiple
    resized = _center_crop(resized, crop_h, crop_w)
    if resized_labels is not None:
        resized_labels = _center_crop(resized_labels, crop_h, crop_w).astype(np.int32)
    return resized, resized_labels
