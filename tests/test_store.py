"""The content-addressed store: keys, atomic publication, resumption, verification, garbage collection."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store.hashing import artifact_key, canonical_json
from pipeline.store import ArraySpec, ArtifactRef, Store
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
