"""The content-addressed store: keys, atomic publication, resumption, verification, garbage collection."""

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, GzipCodec

from pipeline.errors import LdsError
from pipeline.store.hashing import artifact_key, canonical_json
from pipeline.store import ArraySpec, ArtifactRef, Store, array_checksum, read_group, write_arrays
from pipeline.store.integrity import CorruptArtifact
from pipeline.store.maintenance import reachable, verify


def test_same_inputs_give_same_key_and_key_order_of_params_does_not_matter():
    a = artifact_key("solve", 1, {"lr": 0.001, "steps": 10}, ["abc"])
    b = artifact_key("solve", 1, {"steps": 10, "lr": 0.001}, ["abc"])
    assert a == b
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


@pytest.mark.parametrize(
    "change",
    [
        dict(stage="decode"),
        dict(version=2),
        dict(params={"lr": 0.002, "steps": 10}),
        dict(params={"lr": 0.001, "steps": 10, "seed": 1}),
        dict(inputs=["abd"]),
        dict(inputs=["abc", "def"]),
    ],
)
def test_any_change_gives_a_new_key(change):
    base = dict(stage="solve", version=1, params={"lr": 0.001, "steps": 10}, inputs=["abc"])
    changed = {**base, **change}
    assert artifact_key(base["stage"], base["version"], base["params"], base["inputs"]) != artifact_key(
        changed["stage"], changed["version"], changed["params"], changed["inputs"]
    )


def _arrays(value: float) -> dict[str, ArraySpec]:
    return {
        "x": ArraySpec(np.full((2, 3), value, np.float32), ("y", "x"), {"description": "test"}),
        "nested/y": ArraySpec(np.arange(4), ("i",)),
    }


def test_publish_is_atomic_and_self_describing(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "k1")
    writer = store.writer(ref, {"params": {"a": 1}}, [ArtifactRef("extract", "k0")])
    writer.write_item("img0", _arrays(1.0), {"grid": [2, 3]})
    assert not store.exists(ref)  # nothing visible before publish
    writer.write_item("img1", _arrays(2.0))
    writer.publish(["img0", "img1"])
    assert store.exists(ref) and not Path(store.partial_path(ref)).exists()
    group = zarr.open_group(store.path(ref), mode="r")
    assert group.attrs["complete"] is True
    assert group.attrs["inputs"] == [{"stage": "extract", "key": "k0"}]
    array = group["items/img1/x"]
    assert np.all(array[...] == 2.0)
    assert list(array.metadata.dimension_names) == ["y", "x"]
    assert group["items/img0"].attrs["grid"] == [2, 3]
    assert verify(store, ref) == []


def test_publish_refuses_missing_items(tmp_path):
    store = Store(tmp_path)
    writer = store.writer(ArtifactRef("solve", "k1"), {}, [])
    writer.write_item("img0", _arrays(1.0))
    with pytest.raises(RuntimeError, match="img1"):
        writer.publish(["img0", "img1"])


def test_an_interrupted_artifact_resumes_with_its_done_items(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "k1")
    store.writer(ref, {}, []).write_item("img0", _arrays(1.0))
    # a temporary folder left by a kill is not an item
    (tmp_path / ".tmp" / "k1-img1-dead").mkdir(parents=True)
    resumed = store.writer(ref, {}, [])
    assert resumed.done == {"img0"}


def test_verify_detects_a_corrupted_chunk(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "k1")
    writer = store.writer(ref, {}, [])
    writer.write_item("img0", _arrays(1.0))
    writer.publish(["img0"])
    chunk = next(p for p in (Path(store.path(ref)) / "items/img0/x").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert verify(store, ref), "a flipped byte must be reported"


def test_verify_detects_a_missing_item(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "k1")
    writer = store.writer(ref, {}, [])
    writer.write_item("img0", _arrays(1.0))
    writer.publish(["img0"])
    import shutil

    shutil.rmtree(Path(store.path(ref)) / "items" / "img0")
    assert any("img0" in problem for problem in verify(store, ref))


def test_reachable_follows_inputs(tmp_path):
    store = Store(tmp_path)
    for stage, key, inputs in [("a", "1", []), ("b", "2", [ArtifactRef("a", "1")]), ("b", "3", [])]:
        writer = store.writer(ArtifactRef(stage, key), {}, inputs)
        writer.publish([])
    assert reachable(store, [ArtifactRef("b", "2")]) == {ArtifactRef("a", "1"), ArtifactRef("b", "2")}
    store.remove(ArtifactRef("b", "3"))
    assert ArtifactRef("b", "3") not in store.artifacts()


def _write_same_key(root: str, value: float) -> None:
    store = Store(root)
    ref = ArtifactRef("solve", "same")
    with store.lock(ref):
        if store.exists(ref):
            return
        writer = store.writer(ref, {}, [])
        for i in range(5):
            writer.write_item(f"img{i}", _arrays(value))
        writer.publish([f"img{i}" for i in range(5)])


def test_two_processes_asking_for_one_key_do_not_corrupt_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_same_key, args=(str(tmp_path), v)) for v in (1.0, 2.0)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "same")
    assert verify(store, ref) == []
    values = {float(store.open(ref)[f"items/img{i}/x"][0, 0]) for i in range(5)}
    assert len(values) == 1  # every item from the same writer
    assert json.loads((Path(store.path(ref)) / "zarr.json").read_text())["attributes"]["complete"] is True
    assert not any(Path(tmp_path, "solve").glob("*.partial"))


def test_an_fsspec_memory_store_publishes_resumes_verifies_and_removes(tmp_path):
    store = Store(f"memory://store-{tmp_path.name}")
    ref = ArtifactRef("solve", "k1")
    copied: list[str] = []
    copy = store.fs.copy
    store.fs.copy = lambda source, target, **kw: (copied.append(target), copy(source, target, **kw))[1]
    store.writer(ref, {}, []).write_item("img0", _arrays(1.0))
    assert copied[-1].endswith("items/img0/zarr.json")  # an item's metadata lands last: it is whole once seen
    assert store.partials() == [ref] and not store.exists(ref)
    writer = store.writer(ref, {}, [])  # a second run resumes
    assert writer.done == {"img0"}
    writer.write_item("img1", _arrays(2.0))
    location = writer.publish(["img0", "img1"])
    assert copied[-1].endswith("solve/k1.zarr/zarr.json")
    assert location.startswith("memory://") and store.artifacts() == [ref] and store.partials() == []
    assert verify(store, ref) == [] and float(store.open(ref)["items/img1/x"][0, 0]) == 2.0
    store.remove(ref)
    assert store.artifacts() == [] and not store.exists(ref)


# -- write_arrays encodes chunks itself: the files must be the ones zarr writes ----------------------------------
def _mixed_arrays(compressors) -> dict[str, ArraySpec]:
    """Every dtype, shape and chunking the stages store, with values that fill every byte."""
    rng = np.random.default_rng(0)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-300, 3.5])
    strided = rng.integers(-128, 128, (5, 2, 6, 8), dtype=np.int8).transpose(1, 0, 2, 3)  # as extract's heads are
    per_timestep = rng.standard_normal((3, 2, 4, 4, 8)).astype(np.float16)  # Stable Diffusion's: one chunk per timestep
    return {
        "layers/block00/q": ArraySpec(strided, ("head", "y", "x", "dim"), {"description": "q"}, None, compressors),
        "layers/block00/q_scale": ArraySpec(rng.random((2, 8), np.float32), ("head", "dim"), {"description": "scale"}),
        "layers/block01/k": ArraySpec(per_timestep, ("timestep", "head", "y", "x", "dim"), {}, (1, 2, 4, 4, 8), compressors),
        "float64": ArraySpec(special, ("i",), {"nested": {"list": [1, 2.5, None], "text": "é"}}),
        "float32_big_endian": ArraySpec(rng.random((3, 4)).astype(">f4"), ("y", "x")),
        "complex64": ArraySpec((rng.random(4) + 1j).astype(np.complex64), ("i",)),
        "bool": ArraySpec(rng.random(7) > 0.5, ("proposal",)),
        "int64": ArraySpec(rng.integers(-(2**62), 2**62, (4, 3)), ("y", "x")),
        "uint8": ArraySpec(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), ("y", "x", "channel")),
        "edges/int16": ArraySpec(rng.integers(-999, 999, (5, 7), dtype=np.int16), ("y", "x"), {}, (2, 3), compressors),  # chunks padded on both axes
        "edges/masks": ArraySpec(rng.random((5, 3, 4)) > 0.5, ("proposal", "y", "x"), {}, (2, 3, 4)),
        "empty": ArraySpec(np.zeros((0, 4), np.float32), ("proposal", "x"), {}, (1, 4)),
        "empty_unchunked": ArraySpec(np.zeros((0,), np.int32), ("proposal",)),
        "scalar": ArraySpec(np.array(2.5), ()),
    }


def _zarr_reference(folder: Path, arrays: dict[str, ArraySpec], group_attrs: dict[str, dict]) -> None:
    """What zarr itself writes for the same arrays (write_arrays' former implementation)."""
    from pipeline.store.integrity import checksum_codecs

    group = zarr.open_group(folder, mode="w")
    for path, attrs in group_attrs.items():
        (group.require_group(path) if path else group).attrs.update(attrs)
    for name, spec in arrays.items():
        parent, _, leaf = name.rpartition("/")
        data = spec.data
        array = (group.require_group(parent) if parent else group).create_array(
            leaf, shape=data.shape, dtype=data.dtype, chunks=spec.chunks or data.shape, dimension_names=list(spec.dims),
            compressors=checksum_codecs(spec.compressors or checksum_codecs()[:-1]), config={"write_empty_chunks": True},
            attributes={**spec.attrs, "sha256": array_checksum(data)},
        )
        if data.size:
            array[...] = data


def _files(fs, folder: str) -> dict[str, bytes]:
    return {path[len(folder.rstrip("/")) + 1:]: fs.cat_file(path) for path in fs.find(folder)}


def _assert_written_as_zarr_writes(store: Store, folder: str, reference: Path, arrays: dict[str, ArraySpec]) -> None:
    written, expected = _files(store.fs, folder), _files(LocalFileSystem(), str(reference))
    assert sorted(written) == sorted(expected)  # same files: every chunk, none for a zero-size array
    for path, content in expected.items():  # byte for byte: zarr.json text (0.0 is not 0), and chunks through the same codecs
        assert written[path] == content, (path, written[path][:300], content[:300])
    group = store.open_group(folder)
    for name, spec in arrays.items():
        array = group[name]
        assert array.dtype == spec.data.dtype.newbyteorder("=") and array.shape == spec.data.shape
        np.testing.assert_array_equal(array[...], spec.data, strict=False)
        assert array.attrs["sha256"] == array_checksum(spec.data) and tuple(array.metadata.dimension_names or ()) == spec.dims


@pytest.mark.parametrize("compressors", [None, (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)], ids=["zstd", "blosc"])
@pytest.mark.parametrize("root", ["local", "memory"])
def test_write_arrays_writes_the_files_zarr_writes(tmp_path, compressors, root):
    store = Store(tmp_path / "store" if root == "local" else f"memory://write-{tmp_path.name}")
    arrays = _mixed_arrays(compressors)
    group_attrs = {"": {"grid": [5, 6]}, "layers/block00": {"scale": 0.125, "heads": 2}, "edges": {}}
    write_arrays(store, store.join("item"), arrays, group_attrs)
    _zarr_reference(tmp_path / "reference", arrays, group_attrs)
    _assert_written_as_zarr_writes(store, store.join("item"), tmp_path / "reference", arrays)


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")  # zarr's fixed-length strings
def test_arrays_it_cannot_encode_itself_go_through_zarr(tmp_path):
    store = Store(tmp_path / "store")
    arrays = {
        "names": ArraySpec(np.array(["cat", "dog"]), ("class",), {"description": "text"}),
        "gzip/x": ArraySpec(np.arange(12.0).reshape(3, 4), ("y", "x"), {}, (2, 4), (GzipCodec(level=3),)),
        "plain": ArraySpec(np.arange(5, dtype=np.int8), ("i",)),
    }
    write_arrays(store, store.join("item"), arrays, {"": {"a": 1}})
    _zarr_reference(tmp_path / "reference", arrays, {"": {"a": 1}})
    _assert_written_as_zarr_writes(store, store.join("item"), tmp_path / "reference", arrays)


def test_a_flipped_byte_in_a_chunk_fails_its_checksum_on_read(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("extract", "k1")
    writer = store.writer(ref, {}, [])
    writer.write_item("img0", _mixed_arrays((BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)))
    writer.publish(["img0"])
    assert store.open(ref)["items/img0/layers/block01/k"][...].shape == (3, 2, 4, 4, 8)  # reads while whole
    chunk = Path(store.path(ref)) / "items/img0/layers/block01/k/c/1/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="image img0, array layers/block01/k, chunk c/1/0/0/0/0 fails its checksum"):
        store.open(ref)["items/img0/layers/block01/k"][...]
    assert store.open(ref)["items/img0/layers/block01/k"][0].shape == (2, 4, 4, 8)  # the other chunks still read


def test_read_group_reads_every_array_and_group_attribute_below_a_group(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("extract", "k1")
    writer = store.writer(ref, {}, [])
    arrays = _mixed_arrays((BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),))
    writer.write_item("img0", arrays, group_attrs={"layers/block00": {"scale": 0.125}})
    writer.publish(["img0"])
    found, attrs = read_group(store.open(ref)["items/img0"])
    assert set(found) == set(arrays)
    for name, spec in arrays.items():
        np.testing.assert_array_equal(found[name], spec.data)
        assert found[name].dtype == spec.data.dtype.newbyteorder("=")  # as zarr reads them: in native order
    assert attrs["layers/block00"] == {"scale": 0.125} and attrs["layers/block01"] == {} and "edges" in attrs
    chunk = Path(store.path(ref)) / "items/img0/layers/block01/k/c/2/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0x01]))
    with pytest.raises(CorruptArtifact, match="array layers/block01/k, chunk c/2/0/0/0/0 fails its checksum"):
        read_group(store.open(ref)["items/img0/layers"])


def test_write_item_checks_dims_before_writing_anything(tmp_path):
    store = Store(tmp_path)
    writer = store.writer(ArtifactRef("solve", "k1"), {}, [])
    arrays = {"x": ArraySpec(np.zeros((2, 3)), ("y", "x")), "bad": ArraySpec(np.zeros((2, 3)), ("y",))}
    with pytest.raises(ValueError, match="array bad: 2 dimensions but dims"):
        writer.write_item("img0", arrays)
    assert writer.done == set() and not (tmp_path / ".tmp").exists()


@pytest.mark.parametrize("root", ["local", "memory"])
def test_write_root_replaces_an_earlier_array_whole(tmp_path, root):
    store = Store(tmp_path if root == "local" else f"memory://root-{tmp_path.name}")
    ref = ArtifactRef("cluster", "k1")
    store.writer(ref, {}, []).write_root({"centroids": ArraySpec(np.ones((4, 2)), ("cluster", "component"), {}, (1, 2))})
    writer = store.writer(ref, {"params": {"k": 2}}, [])  # a rerun with fewer clusters
    writer.write_root({"centroids": ArraySpec(np.full((2, 2), 3.0), ("cluster", "component"), {}, (1, 2))})
    writer.publish([])
    folder = f"{store.fs_path(ref)}/centroids"
    assert sorted(path[len(folder) + 1:] for path in store.fs.find(folder)) == ["c/0/0", "c/1/0", "zarr.json"]
    group = store.open(ref)
    assert group.attrs["params"] == {"k": 2} and sorted(name for name, _ in group.groups()) == ["items"]
    np.testing.assert_array_equal(group["centroids"][...], np.full((2, 2), 3.0))


def test_a_full_disk_half_way_through_an_item_gives_one_line_and_leaves_no_trace(tmp_path, monkeypatch):
    store = Store(tmp_path)
    writer = store.writer(ArtifactRef("solve", "k1"), {}, [])
    pipe_file = LocalFileSystem.pipe_file

    def full_at_the_second_array(self, path, *args, **kwargs):
        if "/nested/" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pipe_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", full_at_the_second_array)
    with pytest.raises(LdsError, match=r"cannot write solve/k1 item img0 \(No space left on device\)"):
        writer.write_item("img0", _arrays(1.0))
    assert writer.done == set() and not any((tmp_path / ".tmp").iterdir())
