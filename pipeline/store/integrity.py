"""Checksums on read: every stored chunk ends with a crc32c (zarr's own codec) that zarr checks when it
decodes the chunk; this module names the artifact, image and array when a chunk fails that check,
cannot be decoded or is missing, in one line with the command that repairs the store.

``CheckedCodecPipeline`` is zarr's codec pipeline with that translation added; ``check_chunks_on_read``
makes it the pipeline of every array opened afterwards in this process. Arrays written without the
crc32c codec (older artifacts) read as before: a missing chunk there is the fill value, as zarr says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline

from pipeline.errors import LdsError, one_line

# <root>/<stage>/<key>.zarr/<array path>/c/<i>/<j>...: the layout of a published artifact's chunk
CHUNK = re.compile(r"^(?P<root>.*)/(?P<stage>[^/]+)/(?P<key>[^/]+)\.zarr/(?P<array>.+?)/(?P<chunk>c(?:/\d+)*)$")


class CorruptArtifact(LdsError):
    """A stored chunk that is missing, fails its checksum or cannot be decoded."""

    def __init__(self, location: str, reason: str):
        found = CHUNK.match(location)
        self.location, self.chunk, self.reason = location, found["chunk"] if found else location, reason
        if not found:
            super().__init__(f"stored chunk {location} {reason}; run `lds cache verify --repair` and re-run")
            return
        array, item = found["array"], ""
        if array.startswith("items/") and array.count("/") >= 2:
            _, item, array = array.split("/", 2)
        where = f"image {item}, " if item else ""
        root = found["root"].removeprefix("file://")
        super().__init__(
            f"{found['stage']} artifact {found['key']}: {where}array {array}, chunk {self.chunk} {reason}; run "
            f"`lds cache verify --repair --store {root}` (removes it and the manifests naming it), then re-run"
        )

    def __reduce__(self):
        return type(self), (self.location, self.reason)


def checksum_codecs(compressors: tuple[BytesBytesCodec, ...] = (ZstdCodec(),)) -> tuple[BytesBytesCodec, ...]:
    """The bytes-to-bytes codecs of a stored array: its compressors (zarr's default), then a crc32c of their output."""
    return (*compressors, Crc32cCodec())


def _location(getter: Any) -> str:
    """Where a chunk lives: the folder or URL path of its zarr store, then its key."""
    store = getter.store
    base = store.root.as_posix() if hasattr(store, "root") else str(getattr(store, "path", store))
    return f"{base.rstrip('/')}/{getter.path}"


@dataclass(frozen=True)
class _Required:
    """A chunk getter for a checksummed array: every chunk was written (write_empty_chunks), so a
    missing one is damage, not the fill value."""

    getter: Any

    async def get(self, prototype: Any, byte_range: Any = None) -> Any:
        found = await self.getter.get(prototype, byte_range)
        if found is None:
            raise CorruptArtifact(_location(self.getter), "is missing")
        return found


@dataclass(frozen=True)
class CheckedCodecPipeline(BatchedCodecPipeline):
    """zarr's batched codec pipeline; a chunk that fails to read raises CorruptArtifact naming it."""

    async def read_batch(self, batch_info: Any, out: Any, drop_axes: tuple[int, ...] = ()) -> None:
        batch = list(batch_info)
        checked = any(isinstance(codec, Crc32cCodec) for codec in self.bytes_bytes_codecs)
        if checked:
            batch = [(_Required(getter), *rest) for getter, *rest in batch]
        try:
            await super().read_batch(batch, out, drop_axes)
        except CorruptArtifact:
            raise
        except Exception:  # a codec failed on one chunk of the batch: find which, and name it
            for getter, spec, *_ in batch:
                raw = getattr(getter, "getter", getter)
                try:
                    await self.decode_batch([(await raw.get(spec.prototype), spec)])
                except Exception as chunk_error:
                    reason = "fails its checksum" if "checksum" in str(chunk_error) else f"cannot be decoded ({one_line(chunk_error, 120)})"
                    raise CorruptArtifact(_location(raw), reason) from None
            raise


def check_chunks_on_read() -> None:
    """Open every zarr array in this process with CheckedCodecPipeline (idempotent)."""
    path = f"{CheckedCodecPipeline.__module__}.{CheckedCodecPipeline.__qualname__}"
    if zarr.config.get("codec_pipeline.path") != path:
        register_pipeline(CheckedCodecPipeline)
        zarr.config.set({"codec_pipeline.path": path})
