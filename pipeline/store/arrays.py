"""The content-addressed artifact store: Zarr v3 groups under ``<root>/<stage>/<key>.zarr``.

The root is a local folder or any fsspec URL (``memory://``, ``s3://bucket/lds``, ``gs://...``).
An artifact is written under ``<key>.zarr.partial``. Each item (usually one image) is written to a
temporary folder and moved into ``items/<item>`` whole, so a killed run leaves only whole items
behind and the next run resumes with the missing ones. When every item is there, the root attributes
are marked complete and the folder is moved to ``<key>.zarr``: a published artifact is always whole.
On a local disk a move is one rename; elsewhere the group's ``zarr.json`` is copied last, and an
artifact or item counts as present only once its ``zarr.json`` is there. A lock file serialises local
processes that ask for the same key (object stores have no locks: Snakemake never runs one job twice).

Every store has a run journal (``store.journal``, in ``journal.py``); verifying, following lineage and
releasing are in ``maintenance.py``.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator

import numpy as np

from pipeline import __version__
from pipeline.errors import LdsError
from pipeline.store.hashing import sha256_bytes
from pipeline.store.journal import Journal

ITEM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ITEMS = "items"
METADATA = "zarr.json"
# a write that fails for these reasons fails for every item: a full disk or quota, a read-only or forbidden folder
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class ArraySpec:
    """One array to store: its data, the names of its dimensions, and what it means."""

    data: np.ndarray
    dims: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[int, ...] | None = None
    compressors: tuple | None = None  # zarr bytes-to-bytes codecs before the checksum (default: zarr's zstd)


@dataclass(frozen=True)
class ArtifactRef:
    stage: str
    key: str

    def as_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "key": self.key}


def array_checksum(data: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(data).tobytes())


def write_arrays(group, arrays: dict[str, ArraySpec], group_attrs: dict[str, dict] | None = None) -> None:
    """Write arrays into a zarr group; names may contain '/' to nest them in sub-groups. Every chunk is
    stored, even one of fill values, and ends with a crc32c that is checked when it is read."""
    from pipeline.store.integrity import checksum_codecs

    groups = {"": group}

    def sub_group(path: str):
        if path not in groups:
            groups[path] = group.require_group(path)
        return groups[path]

    for path, attrs in (group_attrs or {}).items():
        sub_group(path).attrs.update(attrs)
    for name, spec in arrays.items():
        parent_path, _, leaf = name.rpartition("/")
        data = np.asarray(spec.data)
        if len(spec.dims) != data.ndim:
            raise ValueError(f"array {name}: {data.ndim} dimensions but dims {spec.dims}")
        array = sub_group(parent_path).create_array(
            leaf,
            shape=data.shape,
            dtype=data.dtype,
            chunks=spec.chunks or data.shape or None,
            dimension_names=list(spec.dims),
            compressors=checksum_codecs(spec.compressors) if spec.compressors else checksum_codecs(),
            attributes={**spec.attrs, "sha256": array_checksum(data)},  # written with the metadata, not after it
            config={"write_empty_chunks": True},  # every chunk present: a missing one is damage, not zeros
            overwrite=True,
        )
        if data.size:
            array[...] = data


class Store:
    """A folder of artifacts on any fsspec file system, addressed by (stage, key)."""

    def __init__(self, root: str | Path):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        from pipeline.store.integrity import check_chunks_on_read

        check_chunks_on_read()
        text = os.path.expanduser(str(root))
        self.fs, self.base = fsspec.core.url_to_fs(text)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = self.base if self.local else text.rstrip("/")
        self.journal = Journal(self)

    # -- locations ---------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """A path under the root on this store's file system."""
        return "/".join([self.base.rstrip("/"), *parts])

    def fs_path(self, ref: ArtifactRef) -> str:
        """Where a published artifact lives on this store's file system."""
        return self.join(ref.stage, f"{ref.key}.zarr")

    def _location(self, fs_path: str) -> str:
        return fs_path if self.local else self.fs.unstrip_protocol(fs_path)

    def path(self, ref: ArtifactRef) -> str:
        """Where a published artifact lives: a local path, or a URL zarr and xarray open directly."""
        return self._location(self.fs_path(ref))

    def partial_path(self, ref: ArtifactRef) -> str:
        return self._location(self.fs_path(ref) + ".partial")

    def local_folder(self, name: str) -> Path:
        """A local folder for files that must be on disk (converted weights): in the store when it
        is local, else under ~/.cache/lds."""
        return Path(self.join(name)) if self.local else Path.home() / ".cache" / "lds" / name

    def exists(self, ref: ArtifactRef) -> bool:
        """True when the artifact is published (complete); cheap, opens nothing."""
        return self.fs.isfile(f"{self.fs_path(ref)}/{METADATA}")

    def ensure_writable(self) -> None:
        probe = self.join(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.base, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except OSError as error:
            raise LdsError(
                f"store {self.root} is not writable ({error.strerror or error}); set LDS_CACHE or --store to a "
                "writable folder or URL"
            ) from None

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Turn a write that fails for every item (full disk, read-only folder) into one line."""
        try:
            yield
        except OSError as error:
            if error.errno not in UNWRITABLE:
                raise
            raise LdsError(
                f"store {self.root}: cannot write {what} ({error.strerror or error}); free space or make it writable, or "
                "set LDS_CACHE or --store to another folder or URL, and re-run (items already written are kept)"
            ) from None

    # -- reading -----------------------------------------------------------------------------------
    def open_group(self, fs_path: str, mode: str = "r"):
        """A zarr group at a path of this store's file system."""
        import zarr

        if self.local:
            return zarr.open_group(fs_path, mode=mode)
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(self.fs.unstrip_protocol(fs_path), storage_options=self.fs.storage_options, read_only=mode == "r")
        return zarr.open_group(store=store, mode=mode)

    def open(self, ref: ArtifactRef):
        """The published artifact as a read-only zarr group."""
        if not self.exists(ref):
            raise LdsError(f"artifact {ref.stage}/{ref.key} is not in store {self.root}; run its stage first")
        return self.open_group(self.fs_path(ref))

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        """Root attributes of a published artifact, read straight from its metadata file."""
        return json.loads(self.fs.cat_file(f"{self.fs_path(ref)}/{METADATA}")).get("attributes", {})

    # -- small files beside the artifacts (checkpoints) --------------------------------------------
    def write_file(self, relative: str, data: bytes) -> None:
        """Write bytes under the root, whole or not at all (temporary name, then a move)."""
        final = self.join(relative)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with self.writing(relative):
            self.fs.makedirs(self.fs._parent(final), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)

    def read_file(self, relative: str) -> bytes | None:
        """Bytes of a file under the root, or None when there is none."""
        path = self.join(relative)
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def delete_file(self, relative: str) -> None:
        path = self.join(relative)
        if self.fs.isfile(path):
            self.fs.rm_file(path)

    # -- writing -----------------------------------------------------------------------------------
    def lock(self, ref: ArtifactRef) -> ContextManager[None]:
        """Hold an exclusive lock on a key, so two local processes never write the same artifact."""
        self.ensure_writable()
        return self._file_lock(self.join(ref.stage, f"{ref.key}.lock")) if self.local else nullcontext()

    @staticmethod
    @contextmanager
    def _file_lock(path: str) -> Iterator[None]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writer(self, ref: ArtifactRef, attrs: dict[str, Any], inputs: Iterable[ArtifactRef]) -> "ArtifactWriter":
        """A writer for an artifact in progress; resumes a partial one left by an earlier run."""
        return ArtifactWriter(self, ref, attrs, list(inputs))

    def move_tree(self, source: str, target: str) -> None:
        """Move a zarr group folder whole: one rename locally, its ``zarr.json`` last elsewhere."""
        if self.local:
            os.rename(source, target)
            return
        files = sorted(self.fs.find(source), key=lambda p: p == f"{source}/{METADATA}")
        for file in files:
            self.fs.copy(file, target + file[len(source):])
        self.fs.rm(source, recursive=True)

    # -- what is stored, and unpublishing --------------------------------------------------------
    def artifacts(self) -> list[ArtifactRef]:
        """Every published artifact, sorted by stage and key."""
        found = self.fs.glob(self.join("*", f"*.zarr/{METADATA}"))
        refs = []
        for path in found:
            stage, folder = path.split("/")[-3:-1]
            if not stage.startswith("."):
                refs.append(ArtifactRef(stage, folder[: -len(".zarr")]))
        return sorted(refs, key=lambda ref: (ref.stage, ref.key))

    def partials(self) -> list[ArtifactRef]:
        """Artifacts begun and not yet published (they resume on the next run)."""
        found = self.fs.glob(self.join("*", "*.zarr.partial"))
        return sorted(ArtifactRef(p.split("/")[-2], p.split("/")[-1][: -len(".zarr.partial")]) for p in found)

    def size(self, ref: ArtifactRef) -> int:
        return int(self.fs.du(self.fs_path(ref)))

    def remove(self, ref: ArtifactRef) -> None:
        """Remove a published artifact: unpublished first (moved away, or its zarr.json deleted), so
        readers never see half of it."""
        path = self.fs_path(ref)
        if self.local:
            doomed = self.join(ref.stage, f".{ref.key}.zarr.removing-{uuid.uuid4().hex}")
            os.rename(path, doomed)
            path = doomed
        else:
            self.fs.rm_file(f"{path}/{METADATA}")
        self.fs.rm(path, recursive=True)


def walk_arrays(group, prefix: str = ""):
    for name, array in sorted(group.arrays()):
        yield f"{prefix}{name}", array
    for name, sub in sorted(group.groups()):
        yield from walk_arrays(sub, f"{prefix}{name}/")


def remove_settled(fs, path: str, attempts: int = 20, settle: float = 0.05) -> None:
    """Remove a folder until it stays gone. After a failed write, zarr's other chunk writes of the same batch
    are not cancelled and may still rename files in it (or make it again) while it is being removed."""
    for _ in range(attempts):
        if not fs.exists(path):
            return
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:  # a file renamed under the removal
            pass
        time.sleep(settle)


class ArtifactWriter:
    """Writes one artifact item by item; ``publish`` makes it visible as complete."""

    def __init__(self, store: Store, ref: ArtifactRef, attrs: dict[str, Any], inputs: list[ArtifactRef]):
        self.store, self.ref = store, ref
        self.partial = store.fs_path(ref) + ".partial"
        self.tmp_root = store.join(".tmp")
        self.what = f"{ref.stage}/{ref.key}"
        resuming = store.fs.isfile(f"{self.partial}/{METADATA}")
        with store.writing(self.what):
            self.group = store.open_group(self.partial, mode="r+" if resuming else "w")
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
        found = self.store.fs.glob(f"{self.partial}/{ITEMS}/*/{METADATA}")
        return {path.split("/")[-2] for path in found}

    def write_item(
        self,
        item: str,
        arrays: dict[str, ArraySpec],
        attrs: dict[str, Any] | None = None,
        group_attrs: dict[str, dict] | None = None,
    ) -> bool:
        """Write one item's arrays to a temporary folder, then move it into place whole.

        Returns False when the item was already there (written meanwhile by an interrupted attempt:
        the first one is kept). A write that fails leaves no trace of the item."""
        if not ITEM_NAME.match(item):
            raise ValueError(f"item name {item!r} is not a safe file name")
        fs = self.store.fs
        tmp = f"{self.tmp_root}/{self.ref.key}-{item}-{uuid.uuid4().hex}"
        final = f"{self.partial}/{ITEMS}/{item}"
        try:
            with self.store.writing(f"{self.what} item {item}"):
                group = self.store.open_group(tmp, mode="w")
                group.attrs.update(attrs or {})
                write_arrays(group, arrays, group_attrs)
                if fs.exists(final):
                    return False
                self.store.move_tree(tmp, final)
                return True
        finally:
            remove_settled(fs, tmp)

    def write_root(self, arrays: dict[str, ArraySpec]) -> None:
        """Arrays that belong to the whole artifact rather than one item."""
        with self.store.writing(self.what):
            write_arrays(self.group, arrays)

    def publish(self, items: list[str], attrs: dict[str, Any] | None = None) -> str:
        """Check every item is present, mark the artifact complete and move it into place."""
        missing = sorted(set(items) - self.done)
        if missing:
            raise RuntimeError(f"cannot publish {self.ref.stage}/{self.ref.key}: items missing {missing}")
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self.store.writing(self.what):
            self.group.attrs.update({**(attrs or {}), "items": list(items), "created": created, "complete": True})
            if self.store.exists(self.ref) and "released" not in self.store.attrs(self.ref):
                self.store.fs.rm(self.partial, recursive=True)  # another process published the same key first: same result
            else:
                if self.store.exists(self.ref):  # made again after its arrays were released: this one replaces it
                    self.store.remove(self.ref)
                self.store.move_tree(self.partial, self.store.fs_path(self.ref))
        return self.store.path(self.ref)
