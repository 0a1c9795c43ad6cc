"""Integrity (issue 15): every fault injected for real (flipped bytes, a truncated, a deleted chunk, a deleted
artifact, a manifest of the wrong stage, two concurrent runs, a read-only store, a writer that fails half
way) and the exact outcome: the error line, what `lds cache verify --repair` removed, what the next run
computes."""

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from pipeline.store import ArraySpec, ArtifactRef, Store, array_checksum
from pipeline.store.maintenance import verify
from stages.cli import cli

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["shapes-0000", "shapes-0001"]
CHUNK = "items/shapes-0001/layers/block03/k/c/0/0/0/0"  # one chunk of an extract artifact


def lds(*args, expect_ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def error_line(result) -> str:
    """The one line a failed command prints (click's 'Error: ...'), checked to be the only error output."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


def repair_hint(store: Path) -> str:
    return f"run `lds cache verify --repair --store {store}` (removes it and the manifests naming it), then re-run"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """preprocess -> extract -> solve (exact) of two images with the tiny random ViT: store/ and results/."""
    root = tmp_path_factory.mktemp("made")
    store, results = root / "store", root / "results"
    lds("preprocess", "--dataset", "synthetic-shapes:2", "--size", 64, "--shard-size", 2, "--store", store, "--manifest", results / "preprocess.json")
    lds("extract", "--input", results / "preprocess.json", "--model", "tiny-vit", "--store", store, "--manifest", results / "extract.json")
    lds("solve", "--input", results / "extract.json", "--solver", "exact", "--channels", 4, "--store", store, "--manifest", results / "solve.json")
    return root


@pytest.fixture
def work(made, tmp_path) -> Path:
    """A copy of the made store and results, for one test to damage."""
    shutil.copytree(made, tmp_path / "work")
    return tmp_path / "work"


def ref_of(manifest: Path) -> ArtifactRef:
    record = json.loads(manifest.read_text())
    return ArtifactRef(record["stage"], record["key"])


def events(store: Path, run: str) -> Counter:
    """(event, stage, item) counts of one run's journal."""
    return Counter((r["event"], r["stage"], r["item"]) for r in Store(store).journal.records(run))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    data[start : start + 100] = bytes(b ^ 0xFF for b in data[start : start + 100])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("fault, reason", [(flip, "fails its checksum"), (truncate, "fails its checksum"), (Path.unlink, "is missing")])
def test_a_damaged_chunk_stops_a_stage_with_one_line_naming_it(work, fault, reason):
    store, extract = work / "store", ref_of(work / "results" / "extract.json")
    fault(Path(Store(store).path(extract)) / CHUNK)
    result = lds("solve", "--input", work / "results" / "extract.json", "--solver", "exact", "--channels", 3, "--store", store, expect_ok=False)
    where = f"extract artifact {extract.key}: image shapes-0001, array layers/block03/k, chunk c/0/0/0/0"
    assert error_line(result) == f"Error: {where} {reason}; {repair_hint(store)}"
    assert sorted(ref.stage for ref in Store(store).artifacts()) == ["extract", "preprocess", "solve"]  # no new solve published
    assert verify(Store(store), extract) == [f"items/shapes-0001/layers/block03/k: chunk c/0/0/0/0 {reason}"]


def test_every_chunk_is_stored_with_a_crc32c_even_one_of_zeros(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "new")
    writer = store.writer(ref, {}, [])
    writer.write_item("img0", {"zeros": ArraySpec(np.zeros((2, 3)), ("y", "x"), chunks=(1, 3))})
    writer.publish(["img0"])
    folder = Path(store.path(ref)) / "items/img0/zeros"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.glob("c/*/*")) == ["c/0/0", "c/1/0"]
    array = zarr.open_array(folder, mode="r")  # zarr's own codecs: any zarr v3 reader checks them
    assert [codec.to_dict()["name"] for codec in array.metadata.codecs] == ["bytes", "zstd", "crc32c"] and not array[...].any()


def test_old_artifacts_without_checksums_still_read(tmp_path):
    store = Store(tmp_path)
    ref = ArtifactRef("solve", "old")
    writer = store.writer(ref, {}, [])
    writer.write_item("img0", {})
    item = zarr.open_group(Path(store.partial_path(ref)) / "items" / "img0", mode="r+")
    data = np.arange(6.0).reshape(2, 3)
    for name, values, chunks in (("x", data, (1, 3)), ("zeros", np.zeros(4), (4,))):  # zarr's defaults, as before: no crc32c, no chunk of zeros
        item.create_array(name, data=values, chunks=chunks).attrs["sha256"] = array_checksum(values)
    writer.publish(["img0"])
    assert verify(store, ref) == []
    group = store.open(ref)
    assert np.array_equal(group["items/img0/x"][...], data) and not group["items/img0/zeros"][...].any()
    (Path(store.path(ref)) / "items/img0/x/c/1/0").unlink()  # without checksums a missing chunk reads as zeros ...
    assert np.array_equal(store.open(ref)["items/img0/x"][...], [data[0], [0, 0, 0]])
    assert verify(store, ref) == ["items/img0/x: checksum mismatch"]  # ... and verify still catches it


def test_verify_repair_removes_the_bad_artifact_and_the_manifests_made_from_it_and_the_next_run_remakes_only_it(work, monkeypatch):
    store, results = work / "store", work / "results"
    extract, solve = ref_of(results / "extract.json"), ref_of(results / "solve.json")
    flip(Path(Store(store).path(extract)) / CHUNK)
    checked = lds("cache", "verify", "--store", store, expect_ok=False)
    assert f"BAD extract/{extract.key}\n    items/shapes-0001/layers/block03/k: chunk c/0/0/0/0 fails its checksum" in checked.output
    assert error_line(checked).startswith("Error: 1 of 3 artifacts failed verification; `lds cache verify --repair` removes them")

    repaired = lds("cache", "verify", "--repair", "--results", results, "--store", store)
    assert [line for line in repaired.output.splitlines() if line.startswith("removed")] == [
        f"removed extract/{extract.key}", f"removed {results / 'extract.json'}", f"removed {results / 'solve.json'}"]
    assert sorted(p.name for p in results.iterdir()) == ["preprocess.json"]
    assert sorted(ref.stage for ref in Store(store).artifacts()) == ["preprocess", "solve"]  # solve was made before: intact

    monkeypatch.setenv("LDS_RUN", "after-repair")
    lds("extract", "--input", results / "preprocess.json", "--model", "tiny-vit", "--store", store, "--manifest", results / "extract.json")
    lds("solve", "--input", results / "extract.json", "--solver", "exact", "--channels", 4, "--store", store, "--manifest", results / "solve.json")
    assert events(store, "after-repair") == Counter({("computed", "extract", image): 1 for image in IMAGES}
                                                     | {("published", "extract", ""): 1, ("reused", "solve", ""): 1})
    assert ref_of(results / "solve.json") == solve and lds("cache", "verify", "--store", store).output.count("ok ") == 3


@pytest.mark.parametrize("command, given, expected", [
    ("decode", "extract", "solve"), ("solve", "preprocess", "extract"), ("evaluate", "solve", "decode"),
])
def test_a_manifest_of_the_wrong_stage_is_refused_before_any_work(work, command, given, expected):
    store, manifest = work / "store", work / "results" / f"{given}.json"
    before = sorted(p for p in store.rglob("*"))
    result = lds(command, "--input", manifest, "--store", store, expect_ok=False)
    assert error_line(result) == (f"Error: manifest {manifest} is from lds {given}, but lds {command} reads one from lds {expected}; "
                                  f"pass the manifest lds {expected} wrote")
    assert sorted(p for p in store.rglob("*")) == before  # nothing written, not even a journal record


@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_a_read_only_store_gives_one_line_and_no_partial_artifact(work, monkeypatch, how):
    store = work / "store"
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions: the 'simulated' case raises EROFS instead")
        for folder in [store, *(p for p in store.rglob("*") if p.is_dir())]:
            folder.chmod(0o555)
    else:
        from fsspec.implementations.local import LocalFileSystem

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(LocalFileSystem, "pipe_file", read_only)
    try:
        result = lds("solve", "--input", work / "results" / "extract.json", "--solver", "exact", "--channels", 3, "--store", store, expect_ok=False)
    finally:
        for folder in [store, *(p for p in store.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
    reason = os.strerror(errno.EACCES if how == "chmod" else errno.EROFS)
    assert error_line(result) == f"Error: store {store} is not writable ({reason}); set LDS_CACHE or --store to a writable folder or URL"
    assert Store(store).partials() == [] and len(Store(store).artifacts()) == 3


def test_a_writer_failing_half_way_leaves_only_whole_items_and_the_rerun_does_the_rest(work, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    store, extract = work / "store", work / "results" / "extract.json"
    write = LocalFileSystem.pipe_file

    def disk_fills_on_the_second_image(self, path, *args, **kwargs):
        if "shapes-0001" in path and "/X_ortho/" in path:  # after its X, before the rest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", disk_fills_on_the_second_image)
    monkeypatch.setenv("LDS_RUN", "full-disk")
    result = lds("solve", "--input", extract, "--solver", "exact", "--channels", 3, "--store", store, expect_ok=False)
    [partial] = Store(store).partials()
    assert error_line(result) == (f"Error: store {store}: cannot write solve/{partial.key} item shapes-0001 (No space left on device); free "
                                  "space or make it writable, or set LDS_CACHE or --store to another folder or URL, and re-run (items already written are kept)")
    assert sorted(p.name for p in (Path(Store(store).partial_path(partial)) / "items").iterdir() if p.is_dir()) == ["shapes-0000"]
    assert not any((store / ".tmp").iterdir()) and not Store(store).exists(partial)
    monkeypatch.setattr(LocalFileSystem, "pipe_file", write)
    monkeypatch.setenv("LDS_RUN", "space-freed")
    lds("solve", "--input", extract, "--solver", "exact", "--channels", 3, "--store", store)
    assert events(store, "space-freed") == Counter({("resumed", "solve", ""): 1, ("computed", "solve", "shapes-0001"): 1, ("published", "solve", ""): 1})
    assert verify(Store(store), partial) == []


# -- the workflow: two Snakemake runs at once on one store, then a repair and a hand-deleted artifact ------------------
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1"]
TARGET = "results/shapes/tiny-vit/shard-0/solve.json"


def snakemake(workdir: Path, run: str) -> subprocess.Popen:
    return subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), TARGET], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LDS_RUN": run})


def finish(process: subprocess.Popen) -> str:
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-4000:]
    return log


def test_two_runs_at_once_share_one_store_then_repair_and_a_deleted_artifact_remake_only_what_is_gone(tmp_path):
    store = tmp_path / "store"
    config = {"store": str(store), "results": "results", "datasets": {"shapes": {"spec": "synthetic-shapes:2", "images_per_shard": 2}},
              "models": ["tiny-vit"], "preprocess": {"mode": "short-side", "size": 64}, "solve": {"solver": "exact", "channels": 4},
              "decode": {"clusters": 3, "seed": 0, "instances": False, "dataset_clusters": None}}
    a, b = tmp_path / "a", tmp_path / "b"
    for workdir in (a, b):
        (workdir / "config").mkdir(parents=True)
        (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))

    for process in [snakemake(a, "a-1"), snakemake(b, "b-1")]:  # at once, on one store
        finish(process)
    shard = Path(TARGET).parent
    names = [p.name for p in sorted((a / shard).glob("*.json"))]
    assert names and all(ref_of(a / shard / n) == ref_of(b / shard / n) for n in names)
    records = Store(store).journal.records()
    computed = Counter((r["stage"], r["item"]) for r in records if r["event"] == "computed")
    assert computed == Counter({(stage, image): 1 for stage in ("preprocess", "extract", "solve") for image in IMAGES})  # each once
    for run in ("a-1", "b-1"):  # and each run saw every stage, made by itself or by the other (read intact: solve read extract)
        assert {r["stage"] for r in Store(store).journal.records(run) if r["event"] in ("published", "reused")} == {"preprocess", "extract", "solve"}
    assert all(verify(Store(store), ref) == [] for ref in Store(store).artifacts())

    preprocess = ref_of(b / shard / "preprocess.json")
    truncate(Path(Store(store).path(preprocess)) / "items/shapes-0000/rgb/c/0/0/0")
    repaired = lds("cache", "verify", "--repair", "--results", a / "results", "--store", store)
    removed = [line for line in repaired.output.splitlines() if line.startswith("removed")]
    assert removed[0] == f"removed preprocess/{preprocess.key}"
    assert sorted(removed[1:]) == sorted(f"removed {a / shard / n}" for n in names)  # extract and solve are made from it
    assert "Nothing to be done" not in finish(snakemake(a, "a-2"))
    again = Counter((r["event"], r["stage"]) for r in Store(store).journal.records("a-2") if r["event"] in ("computed", "reused"))
    assert again == Counter({("computed", "preprocess"): 2, ("reused", "extract"): 1, ("reused", "solve"): 1})

    solve = ref_of(b / shard / "solve.json")
    shutil.rmtree(Store(store).path(solve))  # deleted by hand: run b's manifest names a missing artifact
    log = finish(snakemake(b, "b-2"))
    assert f"lds: results/shapes/tiny-vit/shard-0/solve.json names an artifact that is not in store {store}: removed, so its rule runs again" in log
    again = Counter((r["event"], r["stage"]) for r in Store(store).journal.records("b-2") if r["event"] in ("computed", "reused"))
    assert again["computed", "solve"] == 2 and {stage for event, stage in again if event == "computed"} == {"solve"}
    assert ref_of(b / shard / "solve.json") == solve and verify(Store(store), solve) == []
