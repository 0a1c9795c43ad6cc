"""Maintenance of a store (``lds cache verify``, ``gc``, ``release``): check a published artifact, follow
its lineage, and delete the arrays of one that has been used."""

from __future__ import annotations

import datetime as dt
import json
from typing import Iterable

from pipeline.store.arrays import ITEMS, METADATA, ArtifactRef, Store, array_checksum, walk_arrays
from pipeline.store.integrity import CorruptArtifact


def verify(store: Store, ref: ArtifactRef) -> list[str]:
    """Problems found in a published artifact: missing marker or items, missing or damaged chunks
    (their crc32c), wrong checksums of whole arrays."""
    problems: list[str] = []
    try:
        attrs = store.attrs(ref)
    except (OSError, ValueError) as error:
        return [f"unreadable metadata: {error}"]
    if attrs.get("complete") is not True:
        problems.append("not marked complete")
    if attrs.get("released"):  # its arrays were deleted on purpose after use: nothing left to check
        return problems
    group = store.open(ref)
    listed = attrs.get("items", [])
    present = set(group[ITEMS].group_keys()) if ITEMS in group else set()
    problems += [f"item {item} listed but missing" for item in listed if item not in present]
    for name, array in walk_arrays(group):
        try:
            data = array[...]
        except CorruptArtifact as error:
            problems.append(f"{name}: chunk {error.chunk} {error.reason}")
            continue
        except Exception as error:  # zarr raises many kinds on damaged metadata
            problems.append(f"{name}: unreadable ({type(error).__name__}: {error})")
            continue
        expected = array.attrs.get("sha256")
        if expected is None:
            problems.append(f"{name}: no stored checksum")
        elif array_checksum(data) != expected:
            problems.append(f"{name}: checksum mismatch")
    return problems


def reachable(store: Store, roots: Iterable[ArtifactRef]) -> set[ArtifactRef]:
    """The given artifacts and, transitively, every input they were made from."""
    seen: set[ArtifactRef] = set()
    stack = list(roots)
    while stack:
        ref = stack.pop()
        if ref in seen or not store.exists(ref):
            continue
        seen.add(ref)
        stack += [ArtifactRef(i["stage"], i["key"]) for i in store.attrs(ref).get("inputs", [])]
    return seen


def release(store: Store, ref: ArtifactRef, why: str) -> int:
    """Delete the arrays of a published artifact's items once they have been used, keeping its
    metadata (attributes, inputs, items and their attributes), so later stages still find its lineage
    and provenance. The root attribute ``released`` (when, why) is set first, so an interrupted
    release never passes for a whole artifact; a stage asking for it makes it again. Returns the
    bytes freed (0 when it was released already)."""
    if "released" in store.attrs(ref):
        return 0
    before, path, fs = store.size(ref), store.fs_path(ref), store.fs
    metadata = json.loads(fs.cat_file(f"{path}/{METADATA}"))
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    metadata.setdefault("attributes", {})["released"] = {"time": when, "why": why}
    store.write_file(f"{ref.stage}/{ref.key}.zarr/{METADATA}", json.dumps(metadata, indent=2).encode())
    for item in fs.ls(f"{path}/{ITEMS}", detail=True):
        if item["type"] == "directory":
            for entry in fs.ls(item["name"], detail=False):
                if entry.rstrip("/").rsplit("/", 1)[-1] != METADATA:
                    fs.rm(entry, recursive=True)
    return before - store.size(ref)
