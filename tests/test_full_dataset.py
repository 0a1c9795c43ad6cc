"""Full-dataset runs (issue 14): a dataset with a bad file completes (max_failed), extract's attention is
released once its readers have published (extract.keep: until-consumed) and nothing is recomputed after,
the store holds about what the later stages need per image, and extract stores only what its readers read."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.errors import LdsError
from pipeline.failures import allowed_failures, coverage, failed_lineage, parse_max_failed
from pipeline.store import ArraySpec, ArtifactRef, Store, walk_arrays
from pipeline.store.maintenance import verify
from stages.cli import cli
from stages.common import run_stage

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
RUN = "results/photos/tiny-vit"
CONFIG = {
    "store": "store",
    "results": "results",
    "datasets": {"photos": {"spec": "folder:photos", "images_per_shard": 10}},
    "models": ["tiny-vit"],
    "max_failed": 0.1,  # 1 of the shard's 10 images
    "preprocess": {"mode": "short-side", "size": 64},
    "extract": {"dtype": "int8"},
    "solve": {"solver": "exact", "graph": "kq", "channels": 4},
    "decode": {"clusters": 3, "instances": False},
    "baselines": ["tokencut"],
    "baseline_options": {"eigenvectors": 4},
}
BROKEN = "img04"


def snakemake(workdir: Path, *extra: str) -> str:
    """Run Snakemake; what its jobs wrote to their logs (Snakemake names each job's log as it starts it)."""
    run = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *extra], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return "".join((workdir / path).read_text() for path in re.findall(r"^\s+log: (\S+)", run.stdout + run.stderr, re.MULTILINE))


def photos(folder: Path, count: int = 10) -> None:
    """``count`` small JPEGs of coloured rectangles; the fifth cut off half way (a truncated download)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((72, 88, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(0, 40, 2)
        pixels[y : y + 30, x : x + 40] = rng.integers(0, 255, 3)
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        if path.stem == BROKEN:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def refs(store: Store, stage: str) -> list[ArtifactRef]:
    return [ref for ref in store.artifacts() if ref.stage == stage]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> dict:
    """One folder, two Snakemake runs (their jobs' logs): the whole DAG, and again after deleting the metrics."""
    root = tmp_path_factory.mktemp("full-dataset")
    photos(root / "photos")
    (root / "config").mkdir()
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    logs = {"full": snakemake(root)}
    summary = {"md": (root / "results/summary.md").read_text(), "json": json.loads((root / "results/summary.json").read_text())}
    (root / RUN / "metrics.json").unlink()
    logs["after deletion"] = snakemake(root)
    return {"root": root, "store": Store(root / "store"), "logs": logs, "summary": summary}


def test_a_truncated_jpeg_is_left_out_and_the_run_completes(workflow):
    root, store = workflow["root"], workflow["store"]
    metrics = json.loads((root / RUN / "metrics.json").read_text())
    assert metrics["images"] == 9 and metrics["images_failed"] == 1
    assert metrics["coverage"] == "evaluated 9 of 10 images, 1 failed (see summary)"
    assert list(metrics["failed_images"]) == [BROKEN] and metrics["failed_images"][BROKEN].startswith("preprocess: cannot read image")
    baseline = json.loads((root / "results/photos/tiny-vit+tokencut/metrics.json").read_text())
    assert baseline["coverage"] == metrics["coverage"]
    (preprocess,) = refs(store, "preprocess")
    attrs = store.attrs(preprocess)
    assert BROKEN in attrs["failed"] and BROKEN not in attrs["items"] and len(attrs["items"]) == 9
    for stage in ("extract", "solve", "decode", "baseline"):  # later stages skip it
        assert all(BROKEN not in store.attrs(ref)["items"] and len(store.attrs(ref)["items"]) == 9 for ref in refs(store, stage))
    summary = workflow["summary"]["md"]  # the whole run's
    assert "## 1 failed item\n" in summary and f"- preprocess {BROKEN} (" in summary and "left out of the results" in summary
    published = [r for r in store.journal.records() if r["event"] == "published" and r["stage"] == "preprocess"]
    assert [list(r["failed"]) for r in published] == [[BROKEN]]


def test_retention_releases_only_consumed_attention_and_nothing_is_recomputed(workflow):
    root, store, logs = workflow["root"], workflow["store"], workflow["logs"]
    (extract,) = refs(store, "extract")
    attrs = store.attrs(extract)
    assert attrs["params"]["arrays"] == ["q", "k"]  # kq graphs and the attention baseline read Q and K only
    assert attrs["released"]["why"].startswith("used by ") and len(list(walk_arrays(store.open(extract)))) == 0
    assert store.open(extract)[f"items/{attrs['items'][0]}"].attrs["grid"]  # its metadata stays for the lineage
    assert not (root / RUN / "shard-0/extract.json").exists() and (root / RUN / "shard-0/extract-released.json").is_file()
    for ref in store.artifacts():
        assert ref == extract or "released" not in store.attrs(ref)
        assert verify(store, ref) == [], ref
    # released after its readers (solve, the baseline) had published, and only then
    first = store.journal.records(store.journal.runs()[0])
    (released,) = [r for r in first if r["event"] == "released"]
    readers = [r for r in first if r["event"] == "published" and r["stage"] in ("solve", "baseline")]
    assert len(readers) == 2 and max(r["time"] for r in readers) <= released["time"] and released["items"] == 9
    # the re-run finds every artifact after the extract, through its released lineage: nothing computed again
    assert "evaluate: cached" in logs["after deletion"] and ": made " not in logs["after deletion"]
    assert {r["event"] for r in store.journal.records(store.journal.runs()[-1])} == {"reused"} and len(store.journal.runs()) == 2


def test_the_store_holds_no_more_per_image_than_the_arrays_later_stages_read(workflow):
    root, store = workflow["root"], workflow["store"]
    stages = ("preprocess", "extract", "solve", "decode", "baseline", "evaluate")
    files = [f for stage in stages for f in (root / "store" / stage).rglob("*") if f.is_file()]
    metadata = [f for f in files if f.name == "zarr.json"]
    # the bound: every array still held, uncompressed, plus 64 bytes per stored chunk (codec headers and
    # checksums) and the metadata files; the released extract holds metadata only
    held = [array for ref in store.artifacts() for _, array in walk_arrays(store.open(ref))]
    bound = sum(array.nbytes for array in held) + 64 * (len(files) - len(metadata)) + sum(f.stat().st_size for f in metadata)
    stored = sum(f.stat().st_size for f in files)
    assert stored <= bound
    assert {f.name for f in (root / "store" / "extract").rglob("*") if f.is_file()} <= {"zarr.json", f"{refs(store, 'extract')[0].key}.lock"}
    summary = workflow["summary"]["json"]  # the whole run's
    rows = {row["stage"]: row for row in summary["stages"]}
    assert summary["images"] == 9 and summary["mb_stored"] * 1e6 <= bound and summary["mb_stored"] / 9 == pytest.approx(stored / 1e6 / 9, rel=0.05)
    assert rows["extract"]["mb_per_image"] < rows["preprocess"]["mb_per_image"] and summary["released"]["extract"]["images"] == 9
    assert "MB_per_image" in workflow["summary"]["md"] and "Released after use: extract" in workflow["summary"]["md"]


def test_a_released_extract_is_made_again_when_a_stage_needs_it(tmp_path):
    invoke = lambda *args: CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "store")])
    run = tmp_path / "run"
    assert invoke("preprocess", "--dataset", "synthetic-shapes:2", "--size", "64", "--manifest", str(run / "pre.json")).exit_code == 0
    made = invoke("extract", "--input", str(run / "pre.json"), "--model", "tiny-vit", "--arrays", "k,q", "--manifest", str(run / "ex.json"))
    assert made.exit_code == 0, made.output
    store = Store(tmp_path / "store")
    (extract,) = refs(store, "extract")
    assert sorted(name.rsplit("/", 1)[-1] for name, _ in walk_arrays(store.open(extract)["items/shapes-0000"])) == ["k"] * 4 + ["q"] * 4
    vv = invoke("solve", "--input", str(run / "ex.json"), "--solver", "exact", "--channels", "4", "--graph", "vv")
    assert vv.exit_code == 1 and "stores only q, k: extract again with --arrays q,k,v" in vv.output
    assert invoke("solve", "--input", str(run / "ex.json"), "--solver", "exact", "--channels", "4", "--manifest", str(run / "solve.json")).exit_code == 0
    (run / "nope.json").write_text(json.dumps({"stage": "baseline", "key": "0" * 20}))
    early = invoke("cache", "release", str(run / "ex.json"), "--after", str(run / "solve.json"), "--after", str(run / "nope.json"))
    assert early.exit_code == 1 and "not releasing" in early.output and "released" not in store.attrs(extract)
    assert invoke("cache", "release", str(run / "ex.json"), "--after", str(run / "solve.json")).exit_code == 0
    assert "released" in store.attrs(extract) and verify(store, extract) == []
    other = invoke("solve", "--input", str(run / "ex.json"), "--solver", "exact", "--channels", "3")
    assert other.exit_code == 1 and "were deleted after use" in other.output
    again = invoke("extract", "--input", str(run / "pre.json"), "--model", "tiny-vit", "--arrays", "q,k", "--manifest", str(run / "ex.json"))
    assert again.exit_code == 0 and "extract: made" in again.output and refs(store, "extract") == [extract]
    assert "released" not in store.attrs(extract) and len(list(walk_arrays(store.open(extract)))) == 16
    assert invoke("solve", "--input", str(run / "ex.json"), "--solver", "exact", "--channels", "3").exit_code == 0


def test_int8_attention_keeps_the_solvers_subspace_in_half_the_bytes(tmp_path):
    from scipy.linalg import subspace_angles

    invoke = lambda *args: CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "store")])
    assert invoke("preprocess", "--dataset", "synthetic-shapes:2", "--size", "96", "--manifest", str(tmp_path / "pre.json")).exit_code == 0
    store, solved, sizes = Store(tmp_path / "store"), {}, {}
    for dtype in ("float16", "int8"):
        extracted, solution = tmp_path / f"ex-{dtype}.json", tmp_path / f"solve-{dtype}.json"
        assert invoke("extract", "--input", str(tmp_path / "pre.json"), "--model", "tiny-vit", "--dtype", dtype, "--manifest", str(extracted)).exit_code == 0
        assert invoke("solve", "--input", str(extracted), "--solver", "exact", "--channels", "6", "--manifest", str(solution)).exit_code == 0
        ref = ArtifactRef("extract", json.loads(extracted.read_text())["key"])
        sizes[dtype] = sum(f.stat().st_size for f in Path(store.path(ref)).rglob("*") if f.is_file() and f.name != "zarr.json")  # data, not metadata
        solved[dtype] = store.open(ArtifactRef("solve", json.loads(solution.read_text())["key"]))["items/shapes-0001/X_ortho"][...]
    layer = store.open(ref)["items/shapes-0001/layers/block03"]
    assert layer["q"].dtype == np.int8 and layer["q_scale"].shape == (4, 16) and sizes["int8"] < 0.7 * sizes["float16"]
    a, b = (x.reshape(len(x), -1).T for x in (solved["float16"], solved["int8"]))
    assert np.mean(np.cos(subspace_angles(a, b)) ** 2) > 0.99


def test_quantise_is_within_half_a_step_per_channel():
    from pipeline.extract.core import dequantise, quantise, stored_array

    array = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6)).astype(np.float32) * np.arange(1, 7)  # (timestep, head, y, x, dim)
    values, scale = quantise(array)
    assert values.dtype == np.int8 and scale.shape == (2, 3, 6) and np.abs(values).max() == 127
    assert np.all(np.abs(dequantise(values, scale) - array) <= scale[..., None, None, :] / 2 + 1e-6)
    assert np.array_equal(stored_array({"q": values, "q_scale": scale}, "q", 1), dequantise(values[1], scale[1]))


def test_max_failed_counts_and_fractions():
    assert parse_max_failed("3") == 3 and parse_max_failed(0.01) == 0.01 and parse_max_failed("1%") == 0.01 and parse_max_failed(0) == 0
    assert allowed_failures(0.01, 99) == 0 and allowed_failures(0.01, 100) == 1 and allowed_failures(0.1, 10) == 1 and allowed_failures(2, 5) == 2
    for bad in ("-1", "1.5", "some"):
        with pytest.raises(LdsError, match="max_failed"):
            parse_max_failed(bad)
    assert failed_lineage([{"stage": "solve", "failed": {"b": "nan"}}, {"stage": "preprocess", "failed": {"a": "truncated"}}]) == {
        "a": "preprocess: truncated", "b": "solve: nan"}
    assert coverage(9, 0) == "evaluated 9 of 9 images"


def test_a_stage_publishes_within_max_failed_and_resumes_above_it(tmp_path, monkeypatch):
    store = Store(tmp_path)
    items = [f"img{i}" for i in range(10)]

    def run(broken: set[str]):
        def compute(item: str):
            if item in broken:
                raise OSError(f"cannot read {item}")
            return {"x": ArraySpec(np.zeros(2), ("i",))}, {}, {}

        return run_stage(store, "preprocess", {}, ["in"], [], items, compute, {}, tmp_path / "m.json")

    monkeypatch.setenv("LDS_MAX_FAILED", "1")
    with pytest.raises(LdsError, match="2 of 10 items failed .* more than max_failed allows \\(1\\)"):
        run({"img3", "img7"})
    assert store.artifacts() == []
    ref = run({"img7"})  # the re-run retries only the two failed images; one fails again, within the limit
    attrs = store.attrs(ref)
    assert attrs["failed"] == {"img7": "cannot read img7"} and attrs["items"] == [i for i in items if i != "img7"]
    assert json.loads((tmp_path / "m.json").read_text())["items"] == attrs["items"]
    computed = [r["item"] for r in store.journal.records() if r["event"] == "computed"]
    assert sorted(computed) == sorted(set(items) - {"img7"}) and len(computed) == 9  # no image computed twice
    assert run(set()) == ref and [r["event"] for r in store.journal.records() if r["event"] == "reused"] == ["reused"]  # final for its key
