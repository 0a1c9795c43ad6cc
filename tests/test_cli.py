"""The `lds` stages end to end on generated images with a tiny random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.store import ArtifactRef, Store
from pipeline.store.maintenance import verify
from stages.common import read_manifest
from stages.cli import cli

DATASET = "synthetic-shapes:4"


def lds(*args: str, expect_ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run_chain(store: Path, results: Path, steps: int = 30) -> dict[str, Path]:
    manifests = {stage: results / f"{stage}.json" for stage in ("preprocess", "extract", "solve", "decode", "evaluate")}
    common = ["--store", store]
    lds("preprocess", "--dataset", DATASET, "--size", 96, "--shard-size", 4, *common, "--manifest", manifests["preprocess"])
    lds("extract", "--input", manifests["preprocess"], "--model", "tiny-vit", *common, "--manifest", manifests["extract"])
    lds("solve", "--input", manifests["extract"], "--steps", steps, "--channels", 6, *common, "--manifest", manifests["solve"])
    lds("decode", "--input", manifests["solve"], "--clusters", 4, "--figures", results / "figures", *common, "--manifest", manifests["decode"])
    lds("evaluate", "--input", manifests["decode"], "--metrics", results / "metrics.json", *common, "--manifest", manifests["evaluate"])
    return manifests


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    return root / "store", run_chain(root / "store", root / "results")


def test_chain_writes_every_stage_and_figures(chain):
    store_root, manifests = chain
    store = Store(store_root)
    for stage, path in manifests.items():
        record = json.loads(path.read_text())
        ref = ArtifactRef(record["stage"], record["key"])
        assert record["stage"] == stage and store.exists(ref)
        assert verify(store, ref) == []
    extract = store.open(ArtifactRef("extract", json.loads(manifests["extract"].read_text())["key"]))
    assert extract.attrs["pretrained"] is False and "NOT pretrained" in extract.attrs["weights"]
    q = extract["items/shapes-0000/layers/block00/q"]
    assert q.shape == (4, 6, 6, 16) and q.dtype == np.float16
    assert list(q.metadata.dimension_names) == ["head", "y", "x", "dim"]
    figures = sorted((manifests["decode"].parent / "figures").glob("*.png"))
    assert [f.stem for f in figures] == [f"shapes-{i:04d}" for i in range(4)]
    metrics = json.loads((manifests["decode"].parent / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["pretrained"] is False
    assert 0 <= metrics["oracle_miou"] <= 1 and 0 <= metrics["matched_miou"] <= 1


def test_decode_draws_figures_for_the_first_max_figures_images_only(chain, tmp_path):
    store_root, manifests = chain
    for limit, drawn in ((2, ["shapes-0000", "shapes-0001"]), (0, [])):
        folder = tmp_path / f"figures-{limit}"
        lds("decode", "--input", manifests["solve"], "--clusters", 4, "--figures", folder, "--max-figures", limit,
            "--store", store_root, "--manifest", tmp_path / f"d{limit}.json")
        assert sorted(f.stem for f in folder.glob("*.png")) == drawn
    assert json.loads((tmp_path / "d0.json").read_text())["key"] == json.loads(manifests["decode"].read_text())["key"]  # not in the key


def test_rerun_hits_the_cache_and_a_parameter_change_does_not(chain, tmp_path):
    store_root, manifests = chain
    again = lds("solve", "--input", manifests["extract"], "--steps", 30, "--channels", 6, "--store", store_root, "--manifest", tmp_path / "s.json")
    assert "cached" in again.output
    assert json.loads((tmp_path / "s.json").read_text())["key"] == json.loads(manifests["solve"].read_text())["key"]
    changed = lds("solve", "--input", manifests["extract"], "--steps", 31, "--channels", 6, "--store", store_root, "--manifest", tmp_path / "s2.json")
    assert "made" in changed.output
    assert json.loads((tmp_path / "s2.json").read_text())["key"] != json.loads(manifests["solve"].read_text())["key"]


def test_inspect_and_cache_commands(chain, tmp_path):
    store_root, manifests = chain
    shown = lds("inspect", manifests["extract"], "--store", store_root)
    assert "layers/block03/q" in shown.output and "(4, 6, 6, 16)" in shown.output and "resolution" in shown.output
    listing = lds("cache", "ls", "--store", store_root)
    assert all(stage in listing.output for stage in manifests)
    assert "ok " in lds("cache", "verify", "--store", store_root).output
    key = json.loads(manifests["solve"].read_text())["key"]
    assert json.loads(lds("cache", "show", f"solve/{key}", "--store", store_root).output)["key"] == key


def test_gc_keeps_what_the_manifests_reach(chain, tmp_path):
    store_root, manifests = chain
    extra = lds("solve", "--input", manifests["extract"], "--steps", 2, "--channels", 6, "--store", store_root, "--manifest", tmp_path / "extra.json")
    assert extra.exit_code == 0
    extra_ref = ArtifactRef("solve", json.loads((tmp_path / "extra.json").read_text())["key"])
    out = lds("cache", "gc", manifests["evaluate"], "--store", store_root)
    store = Store(store_root)
    assert not store.exists(extra_ref)
    assert all(store.exists(ArtifactRef(s, json.loads(p.read_text())["key"])) for s, p in manifests.items())
    assert "removed" in out.output


def test_corrupted_artifact_fails_verify(tmp_path):
    manifests = run_chain(tmp_path / "store", tmp_path / "results", steps=2)
    key = json.loads(manifests["decode"].read_text())["key"]
    path = tmp_path / "store" / "decode" / f"{key}.zarr" / "items" / "shapes-0001" / "labels"
    chunk = next(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    result = lds("cache", "verify", "--store", tmp_path / "store", expect_ok=False)
    assert result.exit_code != 0 and "BAD decode/" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["preprocess", "--dataset", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
        (["preprocess", "--dataset", "folder:/nonexistent/photos"], "/nonexistent/photos does not exist"),
        (["preprocess", "--dataset", "synthetic-shapes:2", "--shard", "5", "--shard-size", "2"], "shard 5 is empty"),
        (["extract", "--input", "/nonexistent/preprocess.json", "--model", "tiny-vit"], "manifest /nonexistent/preprocess.json does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    result = lds(*args, "--store", tmp_path / "store", expect_ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_unreadable_image_is_named_and_the_store_keeps_the_good_ones(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photos / "a.png")
    (photos / "b.png").write_bytes(b"not a png at all")
    result = lds("preprocess", "--dataset", f"folder:{photos}", "--size", 32, "--store", tmp_path / "store", expect_ok=False)
    assert result.exit_code != 0 and f"cannot read image {photos / 'b.png'}" in result.output
    store = Store(tmp_path / "store")
    assert store.artifacts() == []  # nothing half-made was published
    partial = Path(store.partial_path(store.partials()[0]))
    assert (partial / "items" / "a" / "zarr.json").is_file()  # the good image is kept for the re-run
    assert "1 of 2 items failed (b)" in result.output
    [failure] = [r for r in store.journal.records() if r["event"] == "failed"]
    assert failure["item"] == "b" and "cannot read image" in failure["error"]


def test_unknown_model_and_missing_weights(tmp_path):
    manifest = tmp_path / "pre.json"
    lds("preprocess", "--dataset", "synthetic-shapes:1", "--size", 32, "--store", tmp_path / "s", "--manifest", manifest)
    unknown = lds("extract", "--input", manifest, "--model", "nope", "--store", tmp_path / "s", expect_ok=False)
    assert "unknown model 'nope'" in unknown.output
    # as a user would run it offline: the hub library reads HF_HUB_OFFLINE when it is imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_CACHE", None)
    missing = subprocess.run(
        [sys.executable, "-m", "stages", "extract", "--input", str(manifest), "--model", "dino-vits16", "--store", str(tmp_path / "s")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert missing.returncode != 0
    assert "weights for model dino-vits16" in missing.stderr and "--weights PATH" in missing.stderr
    assert "Traceback" not in missing.stderr
    store = Store(tmp_path / "s")
    assert [ref.stage for ref in store.artifacts()] == ["preprocess"] and verify(store, store.artifacts()[0]) == []


def test_unwritable_store_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = lds("preprocess", "--dataset", "synthetic-shapes:1", "--store", blocker / "store", expect_ok=False)
    assert result.exit_code != 0 and f"store {blocker / 'store'} is not writable" in result.output


def _solve_command(store: Path, manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "stages", "solve", "--input", str(manifest), "--steps", "800", "--channels", "6",
            "--store", str(store), "--manifest", str(out)]


def test_kill_during_a_stage_then_rerun_matches_an_uninterrupted_run(tmp_path):
    store = tmp_path / "store"
    results = tmp_path / "results"
    lds("preprocess", "--dataset", DATASET, "--size", 96, "--store", store, "--manifest", results / "pre.json")
    lds("extract", "--input", results / "pre.json", "--model", "tiny-vit", "--store", store, "--manifest", results / "ext.json")
    command = _solve_command(store, results / "ext.json", results / "solve.json")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    items = None
    deadline = time.time() + 600  # only a bound: the loop ends at the first finished item
    while time.time() < deadline:
        partials = list((store / "solve").glob("*.partial/items/*/zarr.json")) if (store / "solve").exists() else []
        if partials:
            items = {p.parent.name for p in partials}
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert items and len(items) < 4, "the kill must land mid-stage"
    assert not list((store / "solve").glob("*.zarr")), "a killed stage publishes nothing"
    resumed = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "resuming" in resumed.stderr
    # an uninterrupted run in a fresh store
    fresh = tmp_path / "fresh"
    lds("preprocess", "--dataset", DATASET, "--size", 96, "--store", fresh, "--manifest", tmp_path / "f" / "pre.json")
    lds("extract", "--input", tmp_path / "f" / "pre.json", "--model", "tiny-vit", "--store", fresh, "--manifest", tmp_path / "f" / "ext.json")
    subprocess.run(_solve_command(fresh, tmp_path / "f" / "ext.json", tmp_path / "f" / "solve.json"), check=True, capture_output=True)
    key = json.loads((results / "solve.json").read_text())["key"]
    assert key == json.loads((tmp_path / "f" / "solve.json").read_text())["key"]
    a, b = Store(store).open(ArtifactRef("solve", key)), Store(fresh).open(ArtifactRef("solve", key))
    for item in a.attrs["items"]:
        for name in ("X", "X_ortho", "losses"):
            np.testing.assert_array_equal(a[f"items/{item}/{name}"][...], b[f"items/{item}/{name}"][...])
    assert verify(Store(store), ArtifactRef("solve", key)) == []


def test_solve_options_select_graphs_and_store_u(chain, tmp_path):
    store_root, manifests = chain
    out = tmp_path / "vv.json"
    lds("solve", "--input", manifests["extract"], "--solver", "exact", "--graph", "vv", "--variant", "laplacian",
        "--layers", "block03,0", "--heads", "1", "--channels", 4, "--store", store_root, "--manifest", out)
    solved = Store(store_root).open(ArtifactRef("solve", json.loads(out.read_text())["key"]))
    assert solved.attrs["params"]["graphs"] == {"kind": "vv", "variant": "laplacian", "layers": ["block03", "0"], "heads": [1]}
    item = solved["items/shapes-0000"]
    assert item.attrs["graphs"] == ["block03/head1", "block00/head1"]
    u = item["U"][...].reshape(4, -1)
    np.testing.assert_allclose(u @ u.T, np.eye(4), atol=1e-4)
    assert item["eigenvalues"].shape == (2, 4) and item["losses"].shape == (0,)
    bad = lds("solve", "--input", manifests["extract"], "--layers", "block09", "--store", store_root, expect_ok=False)
    assert bad.exit_code != 0 and "layer 'block09' is not stored" in bad.output
    refused = lds("solve", "--input", manifests["extract"], "--parameterisation", "convnet", "--init", "exact", "--store", store_root, expect_ok=False)
    assert refused.exit_code != 0 and "--init exact warm-starts free features only" in refused.output


def test_bench_names_the_available_benchmarks():
    result = lds("bench", "no-such-benchmark", expect_ok=False)
    assert result.exit_code != 0
    assert "no benchmark 'no-such-benchmark'" in result.output and "solver" in result.output


def test_solve_draws_from_the_stored_stable_diffusion_timesteps(tmp_path):
    common = ["--store", tmp_path / "store"]
    lds("preprocess", "--dataset", "synthetic-shapes:1", "--size", 64, "--mode", "center-crop", "--multiple", 32, *common, "--manifest", tmp_path / "p.json")
    lds("extract", "--input", tmp_path / "p.json", "--model", "tiny-sd", "--timesteps", 3, *common, "--manifest", tmp_path / "e.json")
    lds("solve", "--input", tmp_path / "e.json", "--steps", 3, "--channels", 4, *common, "--manifest", tmp_path / "s.json")
    item = Store(tmp_path / "store").open(ArtifactRef("solve", json.loads((tmp_path / "s.json").read_text())["key"]))["items/shapes-0000"]
    assert item.attrs["attention_sets"] == 3
    assert all("@t" in name for name in item.attrs["graphs"])
    assert item["X"].shape[0] == 4 and item["losses"].shape == (3,)


def test_extract_upsamples_token_maps_on_request(chain, tmp_path):
    store_root, manifests = chain
    lds("extract", "--input", manifests["preprocess"], "--model", "tiny-vit", "--upsample-to", 12, "--store", store_root, "--manifest", tmp_path / "e.json")
    extract = Store(store_root).open(ArtifactRef("extract", json.loads((tmp_path / "e.json").read_text())["key"]))
    assert extract["items/shapes-0000/layers/block00/q"].shape == (4, 12, 12, 16)
    assert extract["items/shapes-0000/layers/block00"].attrs["resolution"] == [12, 12]


def test_the_chain_runs_on_an_fsspec_memory_store_and_matches_a_local_one(chain, tmp_path):
    local_store, local = chain
    url = f"memory://lds-{tmp_path.name}"
    remote = run_chain(url, tmp_path / "results")
    for stage in ("preprocess", "extract", "solve", "decode", "evaluate"):
        assert read_manifest(remote[stage]) == read_manifest(local[stage])  # same content address anywhere
    store = Store(url)
    assert json.loads(remote["decode"].read_text())["path"].startswith("memory://")
    ref = read_manifest(remote["solve"])
    assert verify(store, ref) == []
    here, there = Store(local_store).open(ref), store.open(ref)
    item = store.attrs(ref)["items"][0]
    assert np.array_equal(here[f"items/{item}/X_ortho"][...], there[f"items/{item}/X_ortho"][...])
    metrics = [json.loads(path.read_text()) for path in (tmp_path / "results/metrics.json", local["evaluate"].parent / "metrics.json")]
    assert [{k: v for k, v in m.items() if k != "artifact"} for m in metrics] == [{k: v for k, v in metrics[1].items() if k != "artifact"}] * 2
    assert {r["event"] for r in store.journal.records()} >= {"computed", "published"}
    assert not any(r["event"] == "failed" for r in store.journal.records())


def test_preprocess_max_images_keeps_the_first_images_of_the_listing(tmp_path):
    common = ["--dataset", "synthetic-shapes:10", "--size", 32, "--shard-size", 3, "--max-images", 4, "--store", tmp_path / "store"]
    lds("preprocess", *common, "--shard", 1, "--manifest", tmp_path / "last.json")
    assert json.loads((tmp_path / "last.json").read_text())["items"] == ["shapes-0003"]  # shard 1 of the first 4: only the 4th
    result = lds("preprocess", *common, "--shard", 2, expect_ok=False)
    assert result.exit_code != 0 and "shard 2 is empty: the dataset has 4 images" in result.output


def test_stages_that_need_no_torch_start_without_importing_it():
    """`lds` loads a stage's command when it is called: preprocess, decode and evaluate jobs skip torch's
    second of imports; every stage is still listed and found."""
    script = ("import sys, click; from stages.cli import cli; ctx = click.Context(cli); "
              "[cli.get_command(ctx, name) for name in ('preprocess', 'decode', 'evaluate', 'summary')]; "
              "print('torch' in sys.modules, 'solve' in cli.list_commands(ctx))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert done.stdout.split() == ["False", "True"]
    assert cli.get_command(None, "solve").name == "solve" and cli.get_command(None, "no-such-stage") is None


def test_a_stage_ends_with_its_seconds_and_cpu_seconds_which_the_workflow_bench_reads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_workflow import DONE

    result = lds("preprocess", "--dataset", DATASET, "--size", 32, "--store", tmp_path / "store")
    [(stage, cpu)] = DONE.findall(result.output)
    assert stage == "preprocess" and float(cpu) > 0
    assert not DONE.findall(lds("models").output)  # not a stage
