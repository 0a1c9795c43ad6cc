"""Zarr v3 files for arrays, encoded here: byte for byte what zarr writes (``zarr.json`` and every chunk
through its codecs), without zarr's per-array overhead. An artifact's item has dozens of small arrays
(extract: 48 per image), for which zarr's own writes cost five times the encoding (docs/store.md).

The layout of each kind of array (shape, dtype, chunks, dims, codecs) is asked of zarr once, by creating
such an array in memory; chunks are then encoded with the codecs it chose (bytes, zstd or blosc, crc32c)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from pipeline.store.arrays import ArraySpec

ATTRIBUTES = '"attributes": '  # in a zarr.json's text (a '"' inside a JSON string is escaped: this is the key)


@dataclass(frozen=True)
class Layout:
    """How zarr stores arrays of one shape, dtype, chunking, dimension names and codecs: their ``zarr.json``
    and how each chunk is encoded."""

    metadata: tuple[str, str]  # zarr.json's text before and after the value of "attributes"
    indent: int | None  # of that text (zarr's json_indent)
    chunks: tuple[int, ...]
    fill_value: Any
    endian: str | None  # byte order of the bytes codec, '<' or '>'; None for one-byte types
    encoders: tuple[Callable[[Any], bytes], ...]  # the bytes-to-bytes codecs, in order
    chunk_key: Callable[[tuple[int, ...]], str]


_LAYOUTS: dict[tuple, Layout | None] = {}


def array_layout(data: np.ndarray, spec: ArraySpec) -> Layout | None:
    """The layout of an array, made once per signature; None when this module cannot encode its chunks."""
    key = (data.shape, data.dtype, spec.chunks, tuple(spec.dims), repr(spec.compressors))
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= 256:  # shapes that vary per image (proposals) must not grow it for ever
            _LAYOUTS.clear()
        _LAYOUTS[key] = _make_layout(data, spec)
    return _LAYOUTS[key]


def _make_layout(data: np.ndarray, spec: ArraySpec) -> Layout | None:
    """Ask zarr for the metadata and codecs of an empty array like this one, made in memory."""
    import zarr
    from zarr.codecs import BytesCodec
    from zarr.storage import MemoryStore

    if data.dtype.kind not in "biufc":  # bool and numbers: their bytes are their values
        return None
    array = zarr.create_array(MemoryStore(), **creation_args(data, spec))
    encoders = tuple(_encoder(codec) for codec in array.compressors)
    if array.filters or not isinstance(array.serializer, BytesCodec) or None in encoders:
        return None
    endian = array.serializer.endian
    before, _, after = _json(array.metadata.to_dict()).decode().partition(f"{ATTRIBUTES}{{}}")
    return Layout(
        metadata=(before + ATTRIBUTES, after),
        indent=zarr.config.get("json_indent"),
        chunks=array.chunks,
        fill_value=array.fill_value,
        endian=endian and {"little": "<", "big": ">"}[endian.value],
        encoders=encoders,  # type: ignore[arg-type]  # no None left
        chunk_key=array.metadata.chunk_key_encoding.encode_chunk_key,
    )


def creation_args(data: np.ndarray, spec: ArraySpec) -> dict[str, Any]:
    """The arguments of zarr's ``create_array`` for an array, but its name and attributes."""
    from pipeline.store.integrity import checksum_codecs

    return dict(
        shape=data.shape,
        dtype=data.dtype,
        chunks=spec.chunks or data.shape,
        dimension_names=list(spec.dims),
        compressors=checksum_codecs(spec.compressors) if spec.compressors else checksum_codecs(),
        config={"write_empty_chunks": True},  # every chunk present: a missing one is damage, not zeros
    )


def _encoder(codec: Any) -> Callable[[Any], bytes] | None:
    """A function that encodes bytes as a zarr bytes-to-bytes codec does; None for one not known here."""
    import numcodecs
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if isinstance(codec, Crc32cCodec):
        return _append_crc32c
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum).encode
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
        return numcodecs.Blosc(
            cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle[codec.shuffle.value], blocksize=codec.blocksize, typesize=codec.typesize
        ).encode
    return None


def _append_crc32c(data: Any) -> bytes:
    """Bytes followed by their crc32c, little-endian: zarr's crc32c codec."""
    import google_crc32c

    data = bytes(data)
    return data + google_crc32c.value(data).to_bytes(4, "little")


def encoded_chunks(data: np.ndarray, layout: Layout) -> Iterator[tuple[str, bytes]]:
    """Every chunk of an array (none for a zero-size one) by its key, encoded."""
    if not data.size:
        return
    grid = [-(-size // chunk) for size, chunk in zip(data.shape, layout.chunks)]
    for coords in np.ndindex(*grid):
        block = np.asarray(data[tuple(slice(i * n, (i + 1) * n) for i, n in zip(coords, layout.chunks))])
        yield layout.chunk_key(coords), _encode(block, layout)


def _encode(block: np.ndarray, layout: Layout) -> bytes:
    """A chunk as zarr stores it: padded to the chunk shape with the fill value, in the bytes codec's byte
    order, then through each bytes-to-bytes codec."""
    if block.shape != layout.chunks:
        full = np.full(layout.chunks, layout.fill_value, block.dtype)
        full[tuple(slice(0, n) for n in block.shape)] = block
        block = full
    if layout.endian:
        block = block.astype(block.dtype.newbyteorder(layout.endian), copy=False)
    encoded: Any = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    for encode in layout.encoders:
        encoded = encode(encoded)
    return bytes(encoded)


def array_json(layout: Layout, attributes: dict[str, Any]) -> bytes:
    """An array's ``zarr.json``: its layout's with these attributes, in the same text as zarr's (whose JSON
    encoder is slow with an indent, so only the attributes are encoded here)."""
    text = json.dumps(attributes, allow_nan=True, indent=layout.indent)
    if layout.indent is not None:  # one level deeper than on their own
        text = text.replace("\n", "\n" + " " * layout.indent)
    before, after = layout.metadata
    return (before + text + after).encode()


def group_json(attrs: dict[str, Any]) -> bytes:
    """A group's ``zarr.json`` with these attributes."""
    from zarr.core.group import GroupMetadata

    return _json(GroupMetadata(attributes=attrs).to_dict())


def _json(metadata: dict[str, Any]) -> bytes:
    """A ``zarr.json`` as zarr writes it."""
    import zarr

    return json.dumps(metadata, allow_nan=True, indent=zarr.config.get("json_indent")).encode()
