"""The content-addressed artifact store: Zarr v3 groups under ``<root>/<stage>/<key>.zarr``.

The root is a local folder or any fsspec URL (``memory://``, ``s3://bucket/lds``, ``gs://...``).
An artifact is written under ``<key>.zarr.partial``. Each item (usually one image) is written to a
temporary folder and moved into ``items/<item>`` whole, so a killed run leaves only whole items
behind and the next run resumes with the missing ones. When every item is there, the root attributes
are marked complete and the folder is moved to ``<key>.zarr``: a published artifact is always whole.
On a local disk a move is one rename; elsewhere the group's ``zarr.json`` is copied last, and an
artifact or item counts as present only once its ``zarr.json`` is there. A lock file serialises local
processes that ask for the same key (object stores have no locks: Snakemake never runs one job twice).

Every computed, reused or failed item is also recorded in a journal under ``<root>/.journal/<run>/``
(one small JSON file per event), which ``lds summary`` and the tests read as the store's counters.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator

import numpy as np

from pipeline import __version__
from pipeline.errors import LdsError
from pipeline.hashing import sha256_bytes

ITEM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ITEMS = "items"
METADATA = "zarr.json"
JOURNAL = ".journal"
RUN_ENV = "LDS_RUN"  # names the run a journal record belongs to (the Snakefile sets it per workflow run)
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
    from pipeline.integrity import checksum_codecs

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
            compressors=checksum_codecs(spec.compressors) if spec.compressors else checksum_codecs(),
            config={"write_empty_chunks": True},  # every chunk present: a missing one is damage, not zeros
            overwrite=True,
        )
        if data.size:
            array[...] = data
        array.attrs.update({**spec.attrs, "sha256": array_checksum(data)})


def current_run() -> str:
    """The run journal records are filed under: $LDS_RUN, or 'manual' for stages run by hand."""
    return os.environ.get(RUN_ENV) or "manual"


class Store:
    """A folder of artifacts on any fsspec file system, addressed by (stage, key)."""

    def __init__(self, root: str | Path):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        from pipeline.integrity import check_chunks_on_read

        check_chunks_on_read()
        text = os.path.expanduser(str(root))
        self.fs, self.base = fsspec.core.url_to_fs(text)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = self.base if self.local else text.rstrip("/")

    # -- locations ---------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _fs_path(self, ref: ArtifactRef) -> str:
        return self._join(ref.stage, f"{ref.key}.zarr")

    def _location(self, fs_path: str) -> str:
        return fs_path if self.local else self.fs.unstrip_protocol(fs_path)

    def path(self, ref: ArtifactRef) -> str:
        """Where a published artifact lives: a local path, or a URL zarr and xarray open directly."""
        return self._location(self._fs_path(ref))

    def partial_path(self, ref: ArtifactRef) -> str:
        return self._location(self._fs_path(ref) + ".partial")

    def local_folder(self, name: str) -> Path:
        """A local folder for files that must be on disk (converted weights): in the store when it
        is local, else under ~/.cache/lds."""
        return Path(self._join(name)) if self.local else Path.home() / ".cache" / "lds" / name

    def exists(self, ref: ArtifactRef) -> bool:
        """True when the artifact is published (complete); cheap, opens nothing."""
        return self.fs.isfile(f"{self._fs_path(ref)}/{METADATA}")

    def ensure_writable(self) -> None:
        probe = self._join(f".write-probe-{uuid.uuid4().hex}")
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
        return self.open_group(self._fs_path(ref))

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        """Root attributes of a published artifact, read straight from its metadata file."""
        return json.loads(self.fs.cat_file(f"{self._fs_path(ref)}/{METADATA}")).get("attributes", {})

    # -- small files beside the artifacts (checkpoints) --------------------------------------------
    def write_file(self, relative: str, data: bytes) -> None:
        """Write bytes under the root, whole or not at all (temporary name, then a move)."""
        final = self._join(relative)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with self.writing(relative):
            self.fs.makedirs(self.fs._parent(final), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)

    def read_file(self, relative: str) -> bytes | None:
        """Bytes of a file under the root, or None when there is none."""
        path = self._join(relative)
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def delete_file(self, relative: str) -> None:
        path = self._join(relative)
        if self.fs.isfile(path):
            self.fs.rm_file(path)

    # -- writing -----------------------------------------------------------------------------------
    def lock(self, ref: ArtifactRef) -> ContextManager[None]:
        """Hold an exclusive lock on a key, so two local processes never write the same artifact."""
        self.ensure_writable()
        return self._file_lock(self._join(ref.stage, f"{ref.key}.lock")) if self.local else nullcontext()

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

    # -- journal: the store's counters ------------------------------------------------------------
    def record(self, event: str, ref: ArtifactRef, item: str = "", **fields: Any) -> None:
        """File one journal event (computed, reused, resumed, failed) for an item or a whole artifact."""
        record = {"event": event, "stage": ref.stage, "key": ref.key, "item": item, "run": current_run(),
                  "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields}
        name = f"{ref.stage}.{ref.key}.{item or '-'}.{event}.{uuid.uuid4().hex[:12]}.json"
        folder = self._join(JOURNAL, record["run"])
        with self.writing(f"its journal ({JOURNAL}/{record['run']})"):
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.pipe_file(f"{folder}/{name}", json.dumps(record).encode())

    def runs(self) -> list[str]:
        """Runs that have journal records, oldest first."""
        folder = self._join(JOURNAL)
        if not self.fs.isdir(folder):
            return []
        entries = sorted(self.fs.ls(folder, detail=True), key=lambda e: (e.get("mtime") or 0, e["name"]))
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]

    def records(self, run: str | None = None) -> list[dict[str, Any]]:
        """Journal records of one run (every run when None)."""
        pattern = self._join(JOURNAL, run or "*", "*.json")
        return [json.loads(self.fs.cat_file(path)) for path in sorted(self.fs.glob(pattern))]

    def remove_run(self, run: str) -> None:
        """Delete one run's journal records (the artifacts they describe stay)."""
        self.fs.rm(self._join(JOURNAL, run), recursive=True)

    # -- housekeeping ------------------------------------------------------------------------------
    def artifacts(self) -> list[ArtifactRef]:
        """Every published artifact, sorted by stage and key."""
        found = self.fs.glob(self._join("*", f"*.zarr/{METADATA}"))
        refs = []
        for path in found:
            stage, folder = path.split("/")[-3:-1]
            if not stage.startswith("."):
                refs.append(ArtifactRef(stage, folder[: -len(".zarr")]))
        return sorted(refs, key=lambda ref: (ref.stage, ref.key))

    def partials(self) -> list[ArtifactRef]:
        """Artifacts begun and not yet published (they resume on the next run)."""
        found = self.fs.glob(self._join("*", "*.zarr.partial"))
        return sorted(ArtifactRef(p.split("/")[-2], p.split("/")[-1][: -len(".zarr.partial")]) for p in found)

    def size(self, ref: ArtifactRef) -> int:
        return int(self.fs.du(self._fs_path(ref)))

    def verify(self, ref: ArtifactRef) -> list[str]:
        """Problems found in a published artifact: missing marker or items, missing or damaged chunks
        (their crc32c), wrong checksums of whole arrays."""
        from pipeline.integrity import CorruptArtifact

        problems: list[str] = []
        try:
            attrs = self.attrs(ref)
        except (OSError, ValueError) as error:
            return [f"unreadable metadata: {error}"]
        if attrs.get("complete") is not True:
            problems.append("not marked complete")
        if attrs.get("released"):  # its arrays were deleted on purpose after use: nothing left to check
            return problems
        group = self.open(ref)
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
        """Remove a published artifact: unpublished first (moved away, or its zarr.json deleted), so
        readers never see half of it."""
        path = self._fs_path(ref)
        if self.local:
            doomed = self._join(ref.stage, f".{ref.key}.zarr.removing-{uuid.uuid4().hex}")
            os.rename(path, doomed)
            path = doomed
        else:
            self.fs.rm_file(f"{path}/{METADATA}")
        self.fs.rm(path, recursive=True)

    def release(self, ref: ArtifactRef, why: str) -> int:
        """Delete the arrays of a published artifact's items once they have been used, keeping its
        metadata (attributes, inputs, items and their attributes), so later stages still find its lineage
        and provenance. The root attribute ``released`` (when, why) is set first, so an interrupted
        release never passes for a whole artifact; a stage asking for it makes it again. Returns the
        bytes freed (0 when it was released already)."""
        if "released" in self.attrs(ref):
            return 0
        before, path = self.size(ref), self._fs_path(ref)
        metadata = json.loads(self.fs.cat_file(f"{path}/{METADATA}"))
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        metadata.setdefault("attributes", {})["released"] = {"time": when, "why": why}
        self.write_file(f"{ref.stage}/{ref.key}.zarr/{METADATA}", json.dumps(metadata, indent=2).encode())
        for item in self.fs.ls(f"{path}/{ITEMS}", detail=True):
            if item["type"] == "directory":
                for entry in self.fs.ls(item["name"], detail=False):
                    if entry.rstrip("/").rsplit("/", 1)[-1] != METADATA:
                        self.fs.rm(entry, recursive=True)
        return before - self.size(ref)


def walk_arrays(group, prefix: str = ""):
    for name, array in sorted(group.arrays()):
        yield f"{prefix}{name}", array
    for name, sub in sorted(group.groups()):
        yield from walk_arrays(sub, f"{prefix}{name}/")


class ArtifactWriter:
    """Writes one artifact item by item; ``publish`` makes it visible as complete."""

    def __init__(self, store: Store, ref: ArtifactRef, attrs: dict[str, Any], inputs: list[ArtifactRef]):
        self.store, self.ref = store, ref
        self.partial = store._fs_path(ref) + ".partial"
        self.tmp_root = store._join(".tmp")
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
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)

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
                self.store.move_tree(self.partial, self.store._fs_path(self.ref))
        return self.store.path(self.ref)
