"""Dask: the dataset-level K-Means and evaluate's sums over images give the same results on a
dask.distributed cluster (a LocalCluster on loopback) as on the local threaded scheduler; `lds cluster`
clusters a solve-dataset artifact's X_ortho, and K-Means across per-image solves keeps its own name."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.store import ArraySpec, ArtifactRef, Store
from stages.cli import cli
from stages.common import read_manifest

CLASSES, CHANNELS, CELL = 3, 6, 4  # planted classes, channels of X, pixels per token side
SHAPES = [(12, 16), (16, 16), (10, 18), (14, 12), (16, 20), (12, 12)]  # token grids, two shards of three


@pytest.fixture(scope="module")
def dask_cluster():
    """Two single-threaded worker processes and a scheduler on 127.0.0.1; yields the address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def planted_store(root, solver: str = "solve-dataset") -> tuple[Store, list[ArtifactRef], dict[str, np.ndarray]]:
    """Preprocess, solve (stage ``solver``) and decode artifacts of two shards, labels and objects
    following planted classes. solve-dataset: X_ortho is a class mean per token plus noise (the classes
    share means across images) and X is noise, so only X_ortho holds the classes; solve: X and X_ortho
    are both the planted features. Returns the store, the decode refs and each image's planted token
    classes."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(CLASSES, CHANNELS)) * 2
    store, decoded, truths = Store(root), [], {}
    for shard in range(2):
        pre, sol, dec = (ArtifactRef(stage, f"{stage}{shard}") for stage in ("preprocess", solver, "decode"))
        writers = [store.writer(pre, {"params": {}, "classes": ["a", "b", "c"]}, []),
                   store.writer(sol, {"params": {}}, [pre]), store.writer(dec, {"params": {}}, [sol])]
        names = [f"img{shard}{i}" for i in range(3)]
        for name, (height, width) in zip(names, SHAPES[3 * shard :]):
            tokens = np.kron(rng.integers(0, CLASSES, size=(height // 2, width // 2)), np.ones((2, 2), np.int64))
            pixels = np.kron(tokens, np.ones((CELL, CELL), np.int64)).astype(np.int32)
            x = np.moveaxis(means[tokens] + 0.4 * rng.normal(size=(height, width, CHANNELS)), -1, 0).astype(np.float32)
            regions = np.where(rng.random(pixels.shape) < 0.9, (pixels + 1) % CLASSES, 0).astype(np.int32)
            writers[0].write_item(name, {
                "rgb": ArraySpec(np.zeros((*pixels.shape, 3), np.uint8), ("y", "x", "channel")),
                "labels": ArraySpec(pixels, ("y", "x")),
                "instances": ArraySpec(np.stack([pixels == 1, pixels == 2]), ("instance", "y", "x")),
                "instance_crowd": ArraySpec(np.array([False, False]), ("instance",)),
            })
            noise = rng.random(x.shape).astype(np.float32)
            writers[1].write_item(name, {"X": ArraySpec(noise if solver == "solve-dataset" else x, ("channel", "y", "x")),
                                         "X_ortho": ArraySpec(x, ("component", "y", "x"))})
            writers[2].write_item(name, {
                "labels": ArraySpec(regions, ("y", "x")),
                "proposals": ArraySpec(np.stack([tokens == c for c in range(CLASSES)]), ("proposal", "y", "x")),
                "proposal_scores": ArraySpec(np.array([0.9, 0.8, 0.7]), ("proposal",)),
            })
            truths[name] = tokens
        for writer in writers:
            writer.publish(names)
        decoded.append(dec)
    return store, decoded, truths


def manifest(path, ref: ArtifactRef):
    path.write_text(json.dumps(ref.as_dict()))
    return path


def lds(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def solve_inputs(tmp_path, solver: str = "solve-dataset") -> list:
    return [arg for shard in range(2) for arg in ("--input", manifest(tmp_path / f"solve{shard}.json", ArtifactRef(solver, f"{solver}{shard}")))]


def run_cluster(store: Store, tmp_path, *extra, solver: str = "solve-dataset") -> ArtifactRef:
    inputs = solve_inputs(tmp_path, solver)
    result = lds("cluster", *inputs, "--clusters", CLASSES, "--store", store.root, "--manifest", tmp_path / "cluster.json", *extra)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return read_manifest(tmp_path / "cluster.json")


def cluster_maps(store: Store, ref: ArtifactRef) -> dict[str, np.ndarray]:
    group = store.open(ref)
    names = [f"items/{item}/{name}" for item in group.attrs["items"] for name in ("semantic_tokens", "semantic")]
    return {name: group[name][...] for name in [*names, "centroids"]}


def planted_agreement(store: Store, ref: ArtifactRef, truths: dict[str, np.ndarray]) -> float:
    """Adjusted Rand index of the stored token clusters against the planted classes."""
    from sklearn.metrics import adjusted_rand_score

    tokens = store.open(ref)["items"]
    predicted = np.concatenate([tokens[item]["semantic_tokens"][...].ravel() for item in truths])
    return adjusted_rand_score(np.concatenate([t.ravel() for t in truths.values()]), predicted)


def test_cluster_reads_the_solve_dataset_x_ortho_not_a_projection_of_x(tmp_path):
    # X is noise and X_ortho holds the classes: only clustering X_ortho itself finds them
    store, _, truths = planted_store(tmp_path / "store")
    ref = run_cluster(store, tmp_path, "--components", 4)
    assert store.attrs(ref)["basis"] == "dataset" and store.attrs(ref)["params"]["features"] == "X_ortho"
    assert planted_agreement(store, ref, truths) > 0.95
    assert store.open(ref)["centroids"].shape == (CLASSES, 4) and "projection" not in store.open(ref)
    mixed = lds("cluster", "--input", manifest(tmp_path / "a.json", ArtifactRef("solve-dataset", "solve-dataset0")),
                "--input", manifest(tmp_path / "b.json", ArtifactRef("solve", "solve1")), "--store", store.root)
    assert mixed.exit_code != 0 and "all `lds solve-dataset` manifests, or all per-image ones" in mixed.output


def test_kmeans_across_per_image_solves_is_scored_under_its_own_name(tmp_path):
    from pipeline.evaluate.report import tables

    store, decoded, truths = planted_store(tmp_path / "store", solver="solve")
    ref = run_cluster(store, tmp_path, solver="solve")
    assert store.attrs(ref)["basis"] == "per-image" and store.open(ref)["projection"].shape == (CHANNELS, CLASSES)
    assert planted_agreement(store, ref, truths) > 0.95
    args = [a for shard, ref in enumerate(decoded) for a in ("--input", manifest(tmp_path / f"decode{shard}.json", ref))]
    result = lds("evaluate", *args, "--semantic", tmp_path / "cluster.json", "--store", store.root, "--metrics", tmp_path / "metrics.json")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["crossimage_kmeans_miou"] > 0.9 and not [key for key in metrics if key.startswith("semantic_")]
    titles = [table.title for table in tables([{"dataset": "d", "model": "m", **metrics}])]
    assert [t for t in titles if "per-image solves" in t] and not [t for t in titles if t.startswith("Unsupervised semantic")]


def test_dataset_kmeans_on_a_local_cluster_equals_the_local_threads(tmp_path, dask_cluster):
    store, _, truths = planted_store(tmp_path / "store")
    local = run_cluster(store, tmp_path)
    expected = cluster_maps(store, local)
    assert store.attrs(local)["clusters_chosen"] == CLASSES
    assert planted_agreement(store, local, truths) > 0.95
    store.remove(local)
    distributed = run_cluster(store, tmp_path, "--dask-scheduler", dask_cluster)
    assert distributed == local  # the scheduler is not a parameter of the result
    got = cluster_maps(store, distributed)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_lloyd_iterations_on_a_local_cluster_equal_the_local_threads(dask_cluster):
    # K-Means started from a small sample, so that Lloyd has several passes to make over all tokens
    import dask
    import dask.array as da
    from distributed import Client

    from pipeline.dask_compute import dask_scheduler
    from pipeline.decode.dataset_kmeans import fit_dataset_kmeans

    rng = np.random.default_rng(1)
    rows = da.from_array(rng.normal(size=(3000, 4)) + np.repeat(rng.normal(size=(5, 4)), 600, axis=0), chunks=(256, 4))
    with dask_scheduler(None):
        assert dask.config.get("scheduler") == "threads"
        local = fit_dataset_kmeans(rows, 5, seed=3, sample_size=50)
    with dask_scheduler(dask_cluster):
        assert Client.current().scheduler.address == dask_cluster
        remote = fit_dataset_kmeans(rows, 5, seed=3, sample_size=50)
    assert local.iterations > 2 and remote.iterations == local.iterations
    np.testing.assert_array_equal(remote.centres, local.centres)


def test_evaluate_on_a_local_cluster_gives_the_same_metrics(tmp_path, dask_cluster):
    from pipeline.evaluate.metrics import confusion_matrix, oracle_labels

    store, decoded, truths = planted_store(tmp_path / "store")
    run_cluster(store, tmp_path)
    args = [a for shard, ref in enumerate(decoded) for a in ("--input", manifest(tmp_path / f"decode{shard}.json", ref))]
    args += ["--semantic", tmp_path / "cluster.json", "--store", store.root, "--manifest", tmp_path / "evaluate.json"]

    def evaluate(*extra) -> tuple[dict, np.ndarray]:
        result = lds("evaluate", *args, "--metrics", tmp_path / "metrics.json", *extra)
        assert result.exit_code == 0, result.output + repr(result.exception)
        ref = read_manifest(tmp_path / "evaluate.json")
        oracle = store.open(ref)["oracle_confusion"][...]
        store.remove(ref)
        return json.loads((tmp_path / "metrics.json").read_text()), oracle

    local, oracle = evaluate()
    remote, remote_oracle = evaluate("--dask-scheduler", dask_cluster)
    assert remote == local and local["images"] == len(truths) and local["objects"] == 2 * len(truths)
    assert local["semantic_miou"] > 0.9 and local["mask_ap"] > 0.5
    np.testing.assert_array_equal(remote_oracle, oracle)
    # the reduction sums exactly what a loop over the images sums
    total = np.zeros((CLASSES, CLASSES), np.int64)
    for shard, ref in enumerate(decoded):
        regions, images = store.open(ref)["items"], store.open(ArtifactRef("preprocess", f"preprocess{shard}"))["items"]
        for item in store.attrs(ref)["items"]:
            truth = images[item]["labels"][...]
            total += confusion_matrix(truth, oracle_labels(regions[item]["labels"][...], truth), CLASSES, CLASSES)
    np.testing.assert_array_equal(oracle, total)


def test_an_unreachable_scheduler_is_one_line_naming_it(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    store, _, _ = planted_store(tmp_path / "store")
    inputs = solve_inputs(tmp_path)
    result = CliRunner(env={"LDS_DASK_SCHEDULER": address}).invoke(cli, ["cluster", *map(str, inputs), "--store", str(store.root)])
    assert result.exit_code != 0
    message = result.output.strip()
    assert "\n" not in message and message.startswith(f"Error: cannot reach the dask scheduler at {address}"), message


def test_local_threads_follow_the_jobs_thread_count(monkeypatch):
    import dask
    from dask.threaded import get as threaded_get

    from pipeline.dask_compute import dask_scheduler

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what Snakemake sets from a rule's threads
    with dask_scheduler(None):
        assert dask.config.get("num_workers") == 3 and dask.base.get_scheduler() is threaded_get
    monkeypatch.delenv("OMP_NUM_THREADS")
    with dask_scheduler(None):
        assert dask.config.get("num_workers", None) is None  # dask's default: one thread per core
