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
from pipeline.store.zarr_files import array_json, array_layout, creation_args, encoded_chunks, group_json

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


def write_arrays(store: Store, folder: str, arrays: dict[str, ArraySpec], group_attrs: dict[str, dict] | None = None) -> None:
    """Write arrays as Zarr v3 under a folder of the store; names may contain '/' to nest them in sub-groups.
    ``group_attrs`` are the attributes of sub-groups by path ('' is the folder's own group, written only when
    given). Every chunk is stored, even one of fill values, and ends with a crc32c that is checked when it is read.

    The files are encoded by ``zarr_files`` and written in one go, as zarr would write them but without its
    per-array overhead or its per-file temporary name and move: an item's folder is moved into place whole.
    Arrays it cannot encode (not numbers, or codecs other than zstd, blosc and crc32c) go through zarr."""
    groups = {parent: {} for name in arrays for parent in _parents(name)} | (group_attrs or {})
    files = {_join(folder, path, METADATA): group_json(attrs) for path, attrs in groups.items()}
    by_zarr = {}
    for name, spec in arrays.items():
        data = np.asarray(spec.data, order="C")  # one copy of a strided array, for its checksum and its chunks
        if len(spec.dims) != data.ndim:
            raise ValueError(f"array {name}: {data.ndim} dimensions but dims {spec.dims}")
        layout = array_layout(data, spec)
        if layout is None:
            by_zarr[name] = spec
            continue
        files[f"{folder}/{name}/{METADATA}"] = array_json(layout, _attributes(data, spec))
        files |= {f"{folder}/{name}/{key}": chunk for key, chunk in encoded_chunks(data, layout)}
    _put_files(store, files)
    if by_zarr:
        _write_with_zarr(store.open_group(folder, mode="a"), by_zarr)


def _attributes(data: np.ndarray, spec: ArraySpec) -> dict[str, Any]:
    return {**spec.attrs, "sha256": array_checksum(data)}


def _parents(name: str) -> list[str]:
    """The sub-groups an array name sits in: 'a/b/c' is in 'a' and 'a/b'."""
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _join(folder: str, *parts: str) -> str:
    return "/".join([folder, *(part for part in parts if part)])


def _put_files(store: Store, files: dict[str, bytes]) -> None:
    """Write files in one go; on a local disk their folders are made first (object stores have none)."""
    if store.local:
        for folder in {os.path.dirname(path) for path in files}:
            store.fs.makedirs(folder, exist_ok=True)
    store.fs.pipe(files)


def _write_with_zarr(group, arrays: dict[str, ArraySpec]) -> None:
    """Write arrays through zarr itself, into an existing group whose sub-groups are there."""
    for name, spec in arrays.items():
        parent, _, leaf = name.rpartition("/")
        data = np.asarray(spec.data)
        target = group.require_group(parent) if parent else group
        array = target.create_array(leaf, **creation_args(data, spec), attributes=_attributes(data, spec), overwrite=True)
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


def read_group(group) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Every array under a zarr ``group`` and the attributes of every group below it, by path relative to
    it ('block00/q'; 'block00'), read concurrently in one pass of zarr's event loop: half the CPU time of
    reading dozens of small arrays one by one. A damaged chunk raises CorruptArtifact as any read does."""
    import asyncio

    from zarr.core.group import AsyncGroup
    from zarr.core.sync import sync

    async def read() -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        arrays, attrs = {}, {}
        async for path, node in group._async_group.members(max_depth=None):
            if isinstance(node, AsyncGroup):
                attrs[path] = dict(node.attrs)
            else:
                arrays[path] = node
        values = await asyncio.gather(*(array.getitem(...) for array in arrays.values()))
        return dict(zip(arrays, values)), attrs

    return sync(read())


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
                groups = dict(group_attrs or {})
                groups[""] = {**(attrs or {}), **groups.get("", {})}
                write_arrays(self.store, tmp, arrays, groups)
                if fs.exists(final):
                    return False
                self.store.move_tree(tmp, final)
                return True
        finally:
            remove_settled(fs, tmp)

    def write_root(self, arrays: dict[str, ArraySpec]) -> None:
        """Arrays that belong to the whole artifact rather than one item."""
        fs = self.store.fs
        with self.store.writing(self.what):
            for name in arrays:  # replaced whole, as zarr's overwrite does: no chunk of an earlier attempt is left
                if fs.exists(f"{self.partial}/{name}"):
                    fs.rm(f"{self.partial}/{name}", recursive=True)
            write_arrays(self.store, self.partial, arrays)

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
