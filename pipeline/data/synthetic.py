"""``synthetic-shapes:N``: generated images with known label maps and objects (tests, metric checks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.base import Sample
from pipeline.store.hashing import sha256_bytes

CLASSES = ("background", "red", "blue", "yellow")


@dataclass(frozen=True)
class SyntheticImage:
    """Coloured rectangles and discs on a textured background.

    Label 0 is the background; each shape has the label of its colour class (1..3), and each visible
    shape is one object of the instance ground truth.
    """

    id: str
    index: int
    size: int = 96

    @property
    def image_id(self) -> int:
        return self.index

    def content_hash(self) -> str:
        sample = self.load()
        return sha256_bytes(sample.rgb.tobytes() + sample.labels.tobytes() + sample.instances.tobytes())

    def load(self) -> Sample:
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
        present = [c for c in (1, 2, 3) if np.any(labels == c)]  # a shape may be hidden by later ones
        instances = np.stack([labels == c for c in present]) if present else np.zeros((0, size, size), bool)
        return Sample(np.clip(rgb, 0, 255).astype(np.uint8), labels, instances, np.zeros(len(present), bool))


def synthetic_shapes(argument: str) -> list[SyntheticImage] | None:
    """The records of ``synthetic-shapes[:N]`` (8 when N is not given); None when N is not a count."""
    if argument and not (argument.isdigit() and int(argument) > 0):
        return None
    count = int(argument) if argument else 8
    return [SyntheticImage(f"shapes-{i:04d}", i) for i in range(count)]
