"""Images without ground truth: ``skimage-samples``, ``folder:PATH`` and ``glob:PATTERN``."""

from __future__ import annotations

import glob as globbing
import os
from pathlib import Path

from pipeline.data.base import IMAGE_SUFFIXES, FileImage, unique_ids
from pipeline.errors import LdsError

SKIMAGE_SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


def skimage_samples() -> list[FileImage]:
    """Six photographs that ship with scikit-image (no download)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [FileImage(Path(name).stem, folder / name, image_id=i) for i, name in enumerate(SKIMAGE_SAMPLES)]


def folder_images(folder: Path) -> list[FileImage]:
    """Every image file in a folder, sorted by name, not recursive; items named by file stem."""
    if not folder.is_dir():
        raise LdsError(f"dataset folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise LdsError(f"dataset folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    ids = unique_ids([p.stem for p in files], str(folder))
    return [FileImage(item, path, image_id=i) for i, (item, path) in enumerate(zip(ids, files))]


def glob_images(pattern: str) -> list[FileImage]:
    """Image files matching a glob pattern (``**`` recurses), sorted by path; items named by the path
    below the pattern's fixed folder, without suffix (``a/b/c.jpg`` -> ``a_b_c``)."""
    expanded = os.path.expanduser(pattern)
    files = sorted(
        Path(p) for p in globbing.glob(expanded, recursive=True)
        if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file()
    )
    if not files:
        raise LdsError(f"glob pattern {pattern!r} matches no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    parts = Path(expanded).parts
    magic = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    base = Path(*parts[:magic]) if magic < len(parts) else Path(expanded).parent
    names = [str(p.relative_to(base).with_suffix("")) for p in files]
    ids = unique_ids(names, repr(pattern))
    return [FileImage(item, path, image_id=i) for i, (item, path) in enumerate(zip(ids, files))]
