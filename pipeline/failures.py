"""How many images a stage may lose and still publish (``max_failed``), and how a run says what it left out."""

from __future__ import annotations

import math

from pipeline.errors import LdsError

DEFAULT_MAX_FAILED = 0.01  # 1% of a stage's images (rounded down: none of fewer than 100)
MAX_FAILED_ENV = "LDS_MAX_FAILED"  # the Snakefile sets it from the config's max_failed; stages read it


def parse_max_failed(value: str | int | float) -> int | float:
    """A count of images (``3``) or a fraction of a stage's images (``0.01`` or ``1%``)."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        number = -1.0
    if number < 0 or (number >= 1 and number != int(number)) or math.isnan(number):
        raise LdsError(f"max_failed {value!r} is neither a count of images (0, 1, 2 ...) nor a fraction below 1 (0.01 or 1%)")
    return int(number) if number >= 1 or number == 0 else number


def allowed_failures(limit: int | float, items: int) -> int:
    """The failed images a stage of ``items`` images may leave out: a count as given, a fraction of
    ``items`` rounded down."""
    return int(limit) if isinstance(limit, int) else math.floor(limit * items + 1e-9)


def failed_lineage(failures: list[dict[str, str]]) -> dict[str, str]:
    """Item -> 'stage: reason' from the ``failed`` attributes (item -> reason) of the artifacts of a
    lineage, given as ``[{"stage": ..., "failed": {...}}, ...]`` (an image fails once: later stages skip it)."""
    found: dict[str, str] = {}
    for record in failures:
        for item, reason in sorted(record["failed"].items()):
            found.setdefault(item, f"{record['stage']}: {reason}")
    return dict(sorted(found.items()))


def coverage(evaluated: int, failed: int) -> str:
    """'evaluated 9 of 10 images, 1 failed (see summary)'."""
    text = f"evaluated {evaluated} of {evaluated + failed} images"
    return text + (f", {failed} failed (see summary)" if failed else "")
