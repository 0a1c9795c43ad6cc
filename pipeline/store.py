"""The content-addressed artifact store: Zarr v3 groups under ``<root>/<stage>/<key>.zarr``.

An artifact is written under ``<key>.zarr.partial``. Each item (usually one image) is written to a
temporary folder and renamed into ``items/<item>`` in one step, so a killed run leaves only whole items
behind and the next run resumes with the missing ones. When every item is there, the root attributes
are marked complete and the folder is renamed to ``<key>.zarr``: a published artifact is always whole.
A lock file serialises processes that ask for the same key.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline import __version__
from pipeline.errors import LdsError
from pipeline.hashing import sha256_bytes

ITEM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ITEMS = "items"


@dataclass
class ArraySpec:
    """One array to store: its data, the names of its dimensions, and what it means."""

    data: np.ndarray
    dims: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ArtifactRef:
    stage: str
    key: str

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "key": self.key}


def array_checksum(data: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(data).tobytes())


def write_arrays(group, arrays: dict[str, ArraySpec], group_attrs: dict[str, dict] | None = None) -> None:
    """Write arrays into a zarr group; names may contain '/' to nest them in sub-groups."""
    import zarr  # noqa: F401  (imported for its side effect of registering codecs)

    for path, attrs in (group_attrs or {}).items():
        sub = group.require_group(path) if path else group
        sub.attrs.update(attrs)
    for name, spec in arrays.items():
        parent_path, _, leaf = name.rpartition("/")
        parent = group.require_group(parent_path) if parent_path else group
        data = np.asarray(spec.data)
        if len(spec.dims) != data.ndim:
            raise ValueError(f"array {name}: {data.ndim} dimensions but dims {spec.dims}")
        array = parent.create_array(
            leaf,
            shape=data.shape,
            dtype=data.dtype,
            chunks=spec.chunks or data.shape or None,
            dimension_names=list(spec.dims),
            overwrite=True,
        )
        if data.size:
            array[...] = data
        array.attrs.update({**spec.attrs, "sha256": array_checksum(data)})


class Store:
    """A folder of artifacts, addressed by (stage, key)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # -- locations ---------------------------------------------------------------------------------
    def path(self, ref: ArtifactRef) -> Path:
        return self.root / ref.stage / f"{ref.key}.zarr"

    def partial_path(self, ref: ArtifactRef) -> Path:
        return self.root / ref.stage / f"{ref.key}.zarr.partial"

    def exists(self, ref: ArtifactRef) -> bool:
        """True when the artifact is published (complete); cheap, opens nothing."""
        return (self.path(ref) / "zarr.json").is_file()

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise LdsError(
                f"store {self.root} is not writable ({error.strerror}); set LDS_CACHE or --store to a "
                "writable folder"
            ) from None

    # -- reading -----------------------------------------------------------------------------------
    def open(self, ref: ArtifactRef):
        """The published artifact as a read-only zarr group."""
        import zarr

        if not self.exists(ref):
            raise LdsError(f"artifact {ref.stage}/{ref.key} is not in store {self.root}; run its stage first")
        return zarr.open_group(str(self.path(ref)), mode="r")

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        """Root attributes of a published artifact, read straight from its metadata file."""
        return read_attributes(self.path(ref))

    # -- writing -----------------------------------------------------------------------------------
    @contextmanager
    def lock(self, ref: ArtifactRef) -> Iterator[None]:
        """Hold an exclusive lock on a key, so two processes never write the same artifact."""
        self.ensure_writable()
        lock_path = self.root / ref.stage / f"{ref.key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writer(self, ref: ArtifactRef, attrs: dict[str, Any], inputs: Iterable[ArtifactRef]) -> "ArtifactWriter":
        """A writer for an artifact in progress; resumes a partial one left by an earlier run."""
        return ArtifactWriter(self, ref, attrs, list(inputs))

    # -- housekeeping ------------------------------------------------------------------------------
    def artifacts(self) -> list[ArtifactRef]:
        """Every published artifact, sorted by stage and key."""
        if not self.root.is_dir():
            return []
        refs = [
            ArtifactRef(stage_dir.name, entry.name[: -len(".zarr")])
            for stage_dir in self.root.iterdir()
            if stage_dir.is_dir() and not stage_dir.name.startswith(".")
            for entry in stage_dir.iterdir()
            if entry.name.endswith(".zarr")
        ]
        return sorted(refs, key=lambda ref: (ref.stage, ref.key))

    def partials(self) -> list[Path]:
        return sorted(self.root.glob("*/*.zarr.partial")) if self.root.is_dir() else []

    def size(self, ref: ArtifactRef) -> int:
        return sum(p.stat().st_size for p in self.path(ref).rglob("*") if p.is_file())

    def verify(self, ref: ArtifactRef) -> list[str]:
        """Problems found in a published artifact: missing marker or items, wrong shapes or checksums."""
        import zarr

        problems: list[str] = []
        try:
            attrs = self.attrs(ref)
        except (OSError, ValueError) as error:
            return [f"unreadable metadata: {error}"]
        if attrs.get("complete") is not True:
            problems.append("not marked complete")
        group = zarr.open_group(str(self.path(ref)), mode="r")
        listed = attrs.get("items", [])
        present = set(group[ITEMS].group_keys()) if ITEMS in group else set()
        problems += [f"item {item} listed but missing" for item in listed if item not in present]
        for name, array in walk_arrays(group):
            try:
                data = array[...]
            except Exception as error:  # zarr raises many kinds on damaged chunks
                problems.append(f"{name}: unreadable ({type(error).__name__}: {error})")
                continue
            expected = array.attrs.get("sha256")
            if expected is None:
                problems.append(f"{name}: no stored checksum")
            elif array_checksum(data) != expected:
                problems.append(f"{name}: checksum mismatch")
        return problems

    def reachable(self, roots: Iterable[ArtifactRef]) -> set[ArtifactRef]:
        """The given artifacts and, transitively, every input they were made from."""
        seen: set[ArtifactRef] = set()
        stack = list(roots)
        while stack:
            ref = stack.pop()
            if ref in seen or not self.exists(ref):
                continue
            seen.add(ref)
            stack += [ArtifactRef(i["stage"], i["key"]) for i in self.attrs(ref).get("inputs", [])]
        return seen

    def remove(self, ref: ArtifactRef) -> None:
        """Remove a published artifact: renamed away first, so readers never see half of it."""
        path = self.path(ref)
        doomed = path.with_name(f".{path.name}.removing-{uuid.uuid4().hex}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)


def walk_arrays(group, prefix: str = ""):
    for name, array in sorted(group.arrays()):
        yield f"{prefix}{name}", array
    for name, sub in sorted(group.groups()):
        yield from walk_arrays(sub, f"{prefix}{name}/")


def read_attributes(path: Path) -> dict[str, Any]:
    """A zarr v3 group's attributes, from its ``zarr.json`` (fast: no zarr import)."""
    with open(path / "zarr.json") as handle:
        return json.load(handle).get("attributes", {})


class ArtifactWriter:
    """Writes one artifact item by item; ``publish`` makes it visible as complete."""

    def __init__(self, store: Store, ref: ArtifactRef, attrs: dict[str, Any], inputs: list[ArtifactRef]):
        import zarr

        self.store, self.ref = store, ref
        self.partial = store.partial_path(ref)
        self.tmp_root = store.root / ".tmp"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        if (self.partial / "zarr.json").is_file():
            self.group = zarr.open_group(str(self.partial), mode="r+")
        else:
            self.partial.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(str(self.partial), mode="w")
        self.group.attrs.update(
            {
                **attrs,
                "stage": ref.stage,
                "key": ref.key,
                "inputs": [i.as_dict() for i in inputs],
                "lds_version": __version__,
                "complete": False,
            }
        )
        self.group.require_group(ITEMS)

    @property
    def done(self) -> set[str]:
        """Items already written, by this run or an earlier one that was interrupted."""
        items = self.partial / ITEMS
        return {p.name for p in items.iterdir() if (p / "zarr.json").is_file()}

    def write_item(
        self,
        item: str,
        arrays: dict[str, ArraySpec],
        attrs: dict[str, Any] | None = None,
        group_attrs: dict[str, dict] | None = None,
    ) -> None:
        """Write one item's arrays to a temporary folder, then rename it into place in one step."""
        import zarr

        if not ITEM_NAME.match(item):
            raise ValueError(f"item name {item!r} is not a safe file name")
        tmp = self.tmp_root / f"{self.ref.key}-{item}-{uuid.uuid4().hex}"
        group = zarr.open_group(str(tmp), mode="w")
        group.attrs.update(attrs or {})
        write_arrays(group, arrays, group_attrs)
        final = self.partial / ITEMS / item
        if final.exists():  # written meanwhile by an earlier, interrupted attempt: keep the first
            shutil.rmtree(tmp)
            return
        os.rename(tmp, final)

    def write_root(self, arrays: dict[str, ArraySpec]) -> None:
        """Arrays that belong to the whole artifact rather than one item."""
        write_arrays(self.group, arrays)

    def publish(self, items: list[str], attrs: dict[str, Any] | None = None) -> Path:
        """Check every item is present, mark the artifact complete and rename it into place."""
        missing = sorted(set(items) - self.done)
        if missing:
            raise RuntimeError(f"cannot publish {self.ref.stage}/{self.ref.key}: items missing {missing}")
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.group.attrs.update({**(attrs or {}), "items": list(items), "created": created, "complete": True})
        final = self.store.path(self.ref)
        if final.exists():  # another process published the same key first; same inputs, same result
            shutil.rmtree(self.partial)
        else:
            os.rename(self.partial, final)
        return final
