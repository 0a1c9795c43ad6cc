"""The dataset-level solver (METHOD.md sections 1-3, dataset mode): kNN graphs against a brute-force
reference, the objective against numpy, row-wise AdamW against torch, a planted structure shared across
images, exact resumption, and `lds solve-dataset` on small fake extract artifacts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.extract.core import is_coarse, join_heads
from pipeline.solve.dataset import (
    DatasetSolver,
    DatasetSolverParams,
    LayerGraph,
    adamw_rows,
    dataset_layers,
    dataset_objective,
    dataset_orthogonalise,
    knn_graph,
    load_checkpoint,
    pick_layers,
    read_operands,
    save_checkpoint,
    solve_jointly,
    symmetric_part,
)
from pipeline.decode.kmeans import kmeans_labels
from pipeline.evaluate.metrics import confusion_matrix, matched_scores
from pipeline.store import ArraySpec, ArtifactRef, Store
from pipeline.store.maintenance import verify
from stages.cli import cli


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ kNN graphs


def brute_force_knn(left: list[np.ndarray], right: list[np.ndarray], intra: int, inter: int, threshold: float):
    """(W before symmetrisation, final random-walk matrix), dense, one token at a time."""
    image_of = np.concatenate([np.full(len(part), b) for b, part in enumerate(left)])
    similarity = np.concatenate(left) @ np.concatenate(right).T
    total = len(image_of)
    w = np.zeros((total, total))
    for i in range(total):
        same = [j for j in range(total) if image_of[j] == image_of[i] and j != i]
        other = [j for j in range(total) if image_of[j] != image_of[i]]
        for candidates, count in ((same, intra), (other, inter)):
            for j in sorted(candidates, key=lambda j: -similarity[i, j])[:count]:
                if similarity[i, j] > threshold:
                    w[i, j] = similarity[i, j]
    s = (w + w.T) / 2
    degree = s.sum(1, keepdims=True)
    return w, np.divide(s, degree, out=np.zeros_like(s), where=degree > 0)


def unit(rng: np.random.Generator, tokens: int, features: int = 4) -> np.ndarray:
    x = rng.normal(size=(tokens, features))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_elements", [20, 1 << 24])  # one row per chunk, and everything at once
# bfloat16 similarities hold about 3 significant digits; there are no near-ties here, so the same neighbours
@pytest.mark.parametrize("search_dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_knn_graph_matches_brute_force_reference(chunk_elements, search_dtype, atol):
    rng = np.random.default_rng(0)
    sizes = [5, 7, 6]  # images of different token counts
    left = [unit(rng, n) for n in sizes]
    right = [unit(rng, n) for n in sizes]  # qk: queries against other vectors, so A is not symmetric
    graph = knn_graph([torch.from_numpy(x).float() for x in left], [torch.from_numpy(x).float() for x in right],
                      intra=3, inter=4, threshold=0.1, chunk_elements=chunk_elements, search_dtype=search_dtype)
    dense = graph.to_dense().double().numpy()
    w, expected = brute_force_knn(left, right, 3, 4, 0.1)
    np.testing.assert_allclose(dense, expected, atol=atol)
    np.testing.assert_array_equal(dense > 0, expected > 0)
    assert np.count_nonzero(w) > 0 and (w[w != 0] > 0.1).all()
    assert np.count_nonzero(w) < sum(sizes) * 7  # the threshold dropped some neighbours
    nonempty = dense.sum(1) > 0
    np.testing.assert_allclose(dense.sum(1)[nonempty], 1, atol=1e-6)
    np.testing.assert_array_equal(dense > 0, dense.T > 0)  # symmetrised support
    assert np.diag(dense).max() == 0
    symmetrised = knn_graph([torch.from_numpy(x).float() for x in left], [torch.from_numpy(x).float() for x in right],
                            intra=3, inter=4, threshold=0.1, chunk_elements=chunk_elements, search_dtype=search_dtype,
                            symmetrised=True)
    np.testing.assert_allclose(symmetrised.to_dense().numpy(), symmetric_part(graph).to_dense().numpy(), atol=1e-7)


def test_knn_graph_keeps_every_intra_and_inter_neighbour_above_the_threshold():
    rng = np.random.default_rng(1)
    sizes = [4, 6, 5]
    # features in the positive orthant: every similarity is above the threshold, so none is dropped
    parts = [np.abs(rng.normal(size=(n, 4))) + 0.5 for n in sizes]
    parts = [torch.from_numpy(p / np.linalg.norm(p, axis=1, keepdims=True)).float() for p in parts]
    graph = knn_graph(parts, parts, intra=3, inter=50, threshold=0.1, chunk_elements=30).to_dense().numpy()
    w, expected = brute_force_knn([p.numpy() for p in parts], [p.numpy() for p in parts], 3, 50, 0.1)
    # every token: min(3, own - 1) of its own image and all (fewer than 50) tokens of the other images
    own = [min(3, n - 1) for n in sizes for _ in range(n)]
    others = [sum(sizes) - n for n in sizes for _ in range(n)]
    np.testing.assert_array_equal(np.count_nonzero(w, axis=1), np.add(own, others))
    np.testing.assert_array_equal(graph > 0, (w > 0) | (w.T > 0))
    np.testing.assert_allclose(graph, expected, atol=1e-6)


def test_join_heads_and_layer_selection():
    per_head = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    joined = join_heads(per_head)
    assert joined.shape == (3, 4, 10)
    np.testing.assert_array_equal(joined[1, 2], np.concatenate([per_head[0, 1, 2], per_head[1, 1, 2]]))
    assert join_heads(joined) is joined
    grids = {"a": (64, 64), "b": (32, 32), "c": (16, 16), "d": (24, 40)}
    assert [name for name, grid in grids.items() if is_coarse(grid, 32)] == ["b", "c"]
    assert pick_layers(["b", "c", "e"], None) == ["b", "c", "e"] and pick_layers(["b", "c", "e"], "-1, b,e") == ["e", "b"]


def test_read_operands_draws_one_stored_timestep_per_image_for_every_layer(tmp_path):
    import zarr

    rng = np.random.default_rng(5)
    image = zarr.open_group(tmp_path / "item.zarr", mode="w")
    for name in ("mid", "up"):  # Stable Diffusion layers: (timestep, head, y, x, dim)
        group = image.create_group(f"layers/{name}")
        for part in "qkv":
            group.create_array(part, data=rng.normal(size=(3, 2, 4, 4, 5)).astype(np.float16))
    operands = read_operands(image, ["mid", "up"], "kq", 4, "img", np.random.default_rng([0, 7, 1]))
    timestep = np.random.default_rng([0, 7, 1]).integers(3)
    for name in ("mid", "up"):
        np.testing.assert_array_equal(operands[name][0], join_heads(image[f"layers/{name}/q"][timestep]))
        np.testing.assert_array_equal(operands[name][1], join_heads(image[f"layers/{name}/k"][timestep]))
    drawn = {read_operands(image, ["mid"], "vv", 4, "img", np.random.default_rng([0, d, 1]))["mid"][0].tobytes() for d in range(20)}
    assert len(drawn) == 3  # every stored timestep is used


# ------------------------------------------------------------------------------------------- objective


def block_mean(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(C, H, W) averaged over blocks down to ``grid`` (which divides H and W)."""
    c, h, w = image.shape
    return image.reshape(c, grid[0], h // grid[0], grid[1], w // grid[1]).mean(axis=(2, 4))


def random_walk(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.random((n, n)) * (rng.random((n, n)) < 0.3)
    a = a + a.T + np.eye(n) * 0.01
    return a / a.sum(1, keepdims=True)


def test_dataset_objective_matches_dense_numpy_with_layer_weights():
    rng = np.random.default_rng(2)
    x = rng.random((3, 4, 4, 4)) + 0.1  # (images, C, 4, 4)
    layers = [("fine", [(4, 4)] * 3, 1.0), ("coarse", [(2, 2)] * 3, 2.0), ("mixed", [(2, 2), (4, 4), (2, 2)], 1.5)]
    graphs, eig_ref, ortho_ref, eig_terms, ortho_terms = [], [], [], [], []
    for name, grids, weight in layers:
        # all tokens of the batch, image after image, each image's tokens in row-major order
        z = np.concatenate([block_mean(image, grid).reshape(4, -1).T for image, grid in zip(x, grids)])
        z = z / np.linalg.norm(z, axis=0)
        a = random_walk(rng, len(z))  # not symmetric: the solver uses its symmetric part, same quadratic forms
        graphs.append(LayerGraph(name, grids, symmetric_part(torch.from_numpy(a).to_sparse()), weight))
        e = np.diag(z.T @ a @ z)
        o = ((z.T @ z)[~np.eye(4, dtype=bool)] ** 2).mean()
        eig_ref.append(e), ortho_ref.append(o)
        eig_terms.append(weight * np.abs(e - 1)), ortho_terms.append(weight * o)
    loss, eig, ortho = dataset_objective(torch.from_numpy(x), graphs, weight_eig=1.0, weight_ortho=1.0)
    np.testing.assert_allclose(eig.numpy(), np.array(eig_ref), rtol=1e-10)
    np.testing.assert_allclose(ortho.numpy(), np.array(ortho_ref), rtol=1e-10)
    assert loss.item() == pytest.approx(np.mean(eig_terms) + np.mean(ortho_terms), rel=1e-10)

    logits = torch.from_numpy(rng.normal(size=(3, 4, 4, 4))).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dataset_objective(torch.softmax(t, 1), graphs, 1.0, 1.0)[0], (logits,))


def test_adamw_rows_matches_one_torch_adamw_per_image():
    rng = np.random.default_rng(3)
    start = torch.from_numpy(rng.normal(size=(2, 3, 4))).float()
    reference = [torch.nn.Parameter(start[i].clone()) for i in range(2)]
    optimisers = [torch.optim.AdamW([p], lr=0.1, weight_decay=0.05) for p in reference]
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    steps = torch.zeros(2, dtype=torch.int64)
    for rows in ([0], [0], [0, 1], [1], [0, 1]):  # the images' step counts drift apart
        grad = torch.from_numpy(rng.normal(size=(len(rows), 3, 4))).float()
        for g, row in zip(grad, rows):
            reference[row].grad = g.clone()
            optimisers[row].step()
        index = torch.tensor(rows)
        p, m, v, s = param[index], exp_avg[index], exp_avg_sq[index], steps[index] + 1
        adamw_rows(p, grad, m, v, s, lr=0.1, weight_decay=0.05)
        param[index], exp_avg[index], exp_avg_sq[index], steps[index] = p, m, v, s
    torch.testing.assert_close(param, torch.stack([p.detach() for p in reference]), rtol=1e-6, atol=1e-7)


def test_dataset_orthogonalise_is_one_svd_over_all_tokens():
    x = np.random.default_rng(4).random((3, 5, 4, 4))
    ortho = dataset_orthogonalise(x)
    flat = x.transpose(0, 2, 3, 1).reshape(-1, 5)
    flat = flat / np.linalg.norm(flat, axis=0)
    u, s, _ = np.linalg.svd(flat, full_matrices=False)
    got = ortho.transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_allclose(np.abs(got), np.abs(u * s), atol=1e-5)
    np.testing.assert_allclose(got.T @ got, np.diag(s**2), atol=1e-5)


def test_dataset_orthogonalise_normalises_channels_before_the_svd():
    # two channels over 8 tokens (2 images of 2x2): unit vectors a, b with a · b = 1/2, a scaled by 10.
    # Normalised, the Gram matrix is [[1, 1/2], [1/2, 1]]: components (a + b)/√2 and (a - b)/√2 with
    # singular values √(3/2) and √(1/2), whatever the scale; without it the first component is a.
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0]) / 2
    b = np.array([0, 0, 1, 1, 1, 1, 0, 0]) / 2
    x = np.stack([10 * a, b]).reshape(2, 2, 2, 2).transpose(1, 0, 2, 3)  # (images, C, 2, 2)
    got = dataset_orthogonalise(x).transpose(1, 0, 2, 3).reshape(2, 8)  # (component, token)
    first, second = (a + b) / np.sqrt(2), (a - b) / np.sqrt(2)
    np.testing.assert_allclose(got[0] * np.sign(got[0] @ first), first, atol=1e-6)
    np.testing.assert_allclose(got[1] * np.sign(got[1] @ second), second, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1) ** 2, [1.5, 0.5], atol=1e-6)
    raw = np.linalg.svd(np.stack([10 * a, b]).T, full_matrices=False)[0][:, 0]  # the un-normalised SVD
    assert abs(raw @ first) / np.linalg.norm(first) < 0.9 and abs(raw @ a) > 0.99


# ------------------------------------------------------------------------------ planted structure, resume

CLUSTERS, FEATURES = 3, 16


def planted_dataset(images: int, seed: int = 0):
    """Every image's tokens come from the same three clusters (centroid + noise) laid out differently per
    image, at 8x8 and (on 2x2 cells) at 4x4."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(CLUSTERS, FEATURES))
    labels = [np.kron(rng.integers(0, CLUSTERS, size=(4, 4)), np.ones((2, 2), dtype=np.int64)) for _ in range(images)]

    def tokens(regions: np.ndarray) -> np.ndarray:
        return (centroids[regions] + 0.3 * rng.normal(size=regions.shape + (FEATURES,))).astype(np.float32)

    data = [{"fine": (tokens(r), tokens(r)), "coarse": (tokens(r[::2, ::2]), tokens(r[::2, ::2]))} for r in labels]
    return data, np.stack(labels)


PLANTED = DatasetSolverParams(channels=6, resolution=8, batch_size=4, iterations=5, epochs=20, lr=0.1, intra=10, inter=10)


def test_planted_clusters_are_recovered_consistently_across_images():
    data, labels = planted_dataset(8)
    solver = DatasetSolver(len(data), PLANTED)
    solver.train(lambda rows, draw: [data[r] for r in rows])
    assert np.mean(solver.losses[-1]) < 0.6 * np.mean(solver.losses[0])
    x = solver.solution()
    np.testing.assert_allclose(x.sum(1), 1, rtol=1e-5)
    x_ortho = dataset_orthogonalise(x)  # (images, C, 8, 8)
    # one K-Means over every token of the dataset: a region id means the same cluster in every image
    regions = kmeans_labels(np.concatenate(list(x_ortho), axis=1), CLUSTERS)  # images stacked along y
    confusion = confusion_matrix(labels.reshape(-1, 8).ravel(), regions.ravel(), CLUSTERS, CLUSTERS)
    assert matched_scores(confusion)["miou"] > 0.9


def test_cached_graphs_give_the_same_solution_as_rebuilding_them_every_epoch():
    data, _ = planted_dataset(6, seed=3)
    params = replace(PLANTED, batch_size=3, epochs=5, partitions=2)

    def run(rebuild: bool) -> tuple[DatasetSolver, list[tuple[tuple[int, ...], int]]]:
        loads = []

        def load(rows, draw):
            loads.append((tuple(rows), draw))
            return [data[r] for r in rows]

        solver = DatasetSolver(6, params)
        solver.train(load, (lambda s: s.graph_cache.clear()) if rebuild else None)
        return solver, loads

    (cached, cached_loads), (rebuilt, rebuilt_loads) = run(False), run(True)
    assert len(cached_loads) == 2 * 2 and len(rebuilt_loads) == 5 * 2  # partitions x batches, epochs x batches
    assert set(rebuilt_loads) == set(cached_loads)  # a rebuild asks for the same images and draw
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "ema"):
        assert torch.equal(getattr(cached, name), getattr(rebuilt, name)), name
    assert cached.losses == rebuilt.losses
    for epoch in range(2):  # the partitions come round again, and differ from each other
        assert [b.tolist() for b in cached.batches(epoch)] == [b.tolist() for b in cached.batches(epoch + 2)]
    assert [b.tolist() for b in cached.batches(0)] != [b.tolist() for b in cached.batches(1)]


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data, _ = planted_dataset(6, seed=1)
    params = replace(PLANTED, epochs=2)
    store = Store(f"memory://checkpoints-{tmp_path.name}")  # checkpoints live in the store, wherever it is

    def load(rows, draw):
        return [data[r] for r in rows]

    straight = DatasetSolver(6, params)
    straight.train(load)

    class Killed(Exception):
        pass

    def save_then_die(solver):
        save_checkpoint(store, solver.state_dict(), "state.pt")
        raise Killed

    with pytest.raises(Killed):
        DatasetSolver(6, params).train(load, save_then_die)
    resumed = DatasetSolver(6, params)
    resumed.load_state_dict(load_checkpoint(store, "state.pt"))
    assert resumed.epoch == 1 and len(resumed.losses) == 1
    resumed.train(load)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "ema"):
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), name
    assert resumed.losses == straight.losses and resumed.ema_updates == straight.ema_updates
    np.testing.assert_array_equal(resumed.solution(), straight.solution())
    with pytest.raises(ValueError):
        DatasetSolver(5, params).load_state_dict(straight.state_dict())


def test_solve_jointly_reads_stored_operands_and_recovers_the_planted_clusters(tmp_path):
    """`lds solve-dataset`'s work, called directly on extract item groups (values with heads concatenated,
    as a dataset-mode extract stores them): the layers it reads, the same solution as the solver fed the
    operands in memory, and the planted clusters back from one K-Means over the dataset's X_ortho."""
    import zarr

    data, labels = planted_dataset(8)
    root = zarr.open_group(tmp_path / "items.zarr", mode="w")
    for i, image in enumerate(data):
        for layer, (values, _) in image.items():
            root.create_group(f"img{i}/layers/{layer}").create_array("v", data=values[None])  # (1 head, y, x, features)
    assert dataset_layers(root["img0"], PLANTED) == ["coarse", "fine"] and dataset_layers(root["img0"], replace(PLANTED, layers="-1")) == ["fine"]
    assert dataset_layers(root["img0"], replace(PLANTED, resolution=4)) == ["coarse"]
    with pytest.raises(LdsError, match="extract/e has no attention layer at 2x2 or coarser"):
        dataset_layers(root["img0"], replace(PLANTED, resolution=2), "extract/e")
    solution = solve_jointly([(root, f"img{i}") for i in range(8)], ["fine", "coarse"], PLANTED)
    reference = DatasetSolver(8, PLANTED)
    reference.train(lambda rows, draw: [{name: (data[r][name][0], data[r][name][0]) for name in ("fine", "coarse")} for r in rows])
    np.testing.assert_array_equal(solution.x, reference.solution())
    np.testing.assert_array_equal(solution.x_ortho, dataset_orthogonalise(reference.solution()))
    assert solution.losses.shape == (PLANTED.epochs, 2) and solution.root_arrays()["losses"].dims == ("epoch", "batch")
    regions = kmeans_labels(np.concatenate(list(solution.x_ortho), axis=1), CLUSTERS)
    assert matched_scores(confusion_matrix(labels.reshape(-1, 8).ravel(), regions.ravel(), CLUSTERS, CLUSTERS))["miou"] > 0.9
    item = solution.item_arrays(5)
    np.testing.assert_array_equal(item["X_ortho"].data, solution.x_ortho[5])
    assert item["X"].dims == ("channel", "y", "x") and item["X"].data.shape == (6, 8, 8)


def test_the_solver_settings_leave_out_what_is_read_and_where():
    params = DatasetSolverParams(layers="0,1", device="cpu")
    assert params.solver_settings() == {**DatasetSolverParams().solver_settings()}  # a checkpoint fits either
    assert DatasetSolver(2, params).state_dict()["params"] == DatasetSolverParams().solver_settings()


# ----------------------------------------------------------------------------------------------- CLI


def fake_shards(store: Store, shards: int = 2, per_shard: int = 2) -> list[ArtifactRef]:
    """Preprocess and extract artifacts as the stages store them: per-head q/k/v at 4x4, one layer with
    heads already concatenated, one layer at 8x8 (finer than the solver's resolution 4)."""
    data, labels = planted_dataset(shards * per_shard, seed=2)
    refs = []
    for shard in range(shards):
        pre = ArtifactRef("preprocess", f"pre{shard}")
        writer = store.writer(pre, {"params": {}}, [])
        ext = ArtifactRef("extract", f"ext{shard}")
        ext_writer = store.writer(ext, {"params": {}, "model": "fake", "pretrained": False}, [pre])
        names = [f"img{shard * per_shard + i}" for i in range(per_shard)]
        for name in names:
            i = int(name[3:])
            coarse = labels[i][::2, ::2]
            writer.write_item(name, {
                "rgb": ArraySpec(np.zeros((16, 16, 3), np.uint8), ("y", "x", "channel")),
                "labels": ArraySpec(np.kron(coarse, np.ones((4, 4), np.int64)).astype(np.int32), ("y", "x")),
            })
            fine = data[i]["coarse"][0]  # (4, 4, 16) tokens of the 4x4 grid
            per_head = np.stack([fine[..., :8], fine[..., 8:]]).astype(np.float16)  # (head, y, x, dim)
            arrays = {f"layers/block00/{a}": ArraySpec(per_head, ("head", "y", "x", "dim")) for a in "qkv"}
            arrays |= {f"layers/block01/{a}": ArraySpec(fine.astype(np.float16), ("y", "x", "dim")) for a in "qkv"}
            arrays |= {f"layers/block02/{a}": ArraySpec(np.zeros((2, 8, 8, 4), np.float16), ("head", "y", "x", "dim")) for a in "qkv"}
            ext_writer.write_item(name, arrays)
        writer.publish(names)
        ext_writer.publish(names)
        refs.append(ext)
    return refs


def write_manifest(path: Path, store: Store, ref: ArtifactRef) -> Path:
    path.write_text(json.dumps({"stage": ref.stage, "key": ref.key, "path": store.path(ref)}))
    return path


def read_ref(manifest: Path) -> ArtifactRef:
    record = json.loads(manifest.read_text())
    return ArtifactRef(record["stage"], record["key"])


def lds(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


SOLVE_ARGS = ["--channels", 4, "--resolution", 4, "--batch-size", 2, "--epochs", 3, "--intra", 5, "--inter", 5, "--lr", 0.1]


def test_solve_dataset_cli_writes_one_artifact_per_shard_that_decode_and_evaluate_read(tmp_path):
    store = Store(tmp_path / "store")
    inputs = [write_manifest(tmp_path / f"extract{i}.json", store, ref) for i, ref in enumerate(fake_shards(store))]
    outputs = [tmp_path / "solve0.json", tmp_path / "solve1.json"]
    common = ["--store", store.root]
    result = lds("solve-dataset", "--input", inputs[0], "--input", inputs[1], *SOLVE_ARGS, *common,
                 "--manifest", outputs[0], "--manifest", outputs[1])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for shard, manifest in enumerate(outputs):
        record = json.loads(manifest.read_text())
        ref = ArtifactRef(record["stage"], record["key"])
        assert ref.stage == "solve-dataset" and verify(store, ref) == []
        group = store.open(ref)
        assert group.attrs["items"] == [f"img{2 * shard}", f"img{2 * shard + 1}"]
        assert group.attrs["inputs"] == [{"stage": "extract", "key": f"ext{shard}"}]
        assert group["losses"].shape == (3, 2)  # (epoch, batch)
        for item in group.attrs["items"]:
            assert group[f"items/{item}"].attrs["layers"] == ["block00", "block01"]  # block02 (8x8) dropped
            x, x_ortho = group[f"items/{item}/X"][...], group[f"items/{item}/X_ortho"][...]
            assert x.shape == x_ortho.shape == (4, 4, 4)
            np.testing.assert_allclose(x.sum(0), 1, rtol=1e-5)
    assert not list((Path(store.root) / "solve-dataset").glob("*.checkpoint.pt"))  # removed once published

    again = lds("solve-dataset", "--input", inputs[0], "--input", inputs[1], *SOLVE_ARGS, *common)
    assert again.exit_code == 0 and again.output.count("cached") == 2
    for shard in range(2):  # decode and evaluate take a solve-dataset artifact as they take a solve one
        decoded = lds("decode", "--input", outputs[shard], "--clusters", 3, *common, "--manifest", tmp_path / f"d{shard}.json")
        assert decoded.exit_code == 0, decoded.output + repr(decoded.exception)
    evaluated = lds("evaluate", "--input", tmp_path / "d0.json", "--input", tmp_path / "d1.json", *common,
                    "--metrics", tmp_path / "metrics.json")
    assert evaluated.exit_code == 0, evaluated.output + repr(evaluated.exception)
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 4


def test_solve_dataset_cli_resumes_a_killed_run_from_its_checkpoint(tmp_path, monkeypatch):
    import stages.solve_dataset as stage

    def run(store: Store, inputs: list[Path], *extra):
        return lds("solve-dataset", "--input", inputs[0], "--input", inputs[1], *SOLVE_ARGS, "--store", store.root, *extra)

    straight = Store(tmp_path / "straight")
    done = run(straight, [write_manifest(tmp_path / f"s{i}.json", straight, r) for i, r in enumerate(fake_shards(straight))],
               "--manifest", tmp_path / "straight.json", "--manifest", tmp_path / "straight1.json")
    assert done.exit_code == 0, done.output + repr(done.exception)
    expected = straight.open(read_ref(tmp_path / "straight.json"))["items/img0/X"][...]

    class Killed(Exception):
        pass

    original = stage.save_checkpoint

    def save_then_die(store, state, name):
        original(store, state, name)
        raise Killed

    store = Store(tmp_path / "store")
    inputs = [write_manifest(tmp_path / f"e{i}.json", store, r) for i, r in enumerate(fake_shards(store))]
    monkeypatch.setattr(stage, "save_checkpoint", save_then_die)
    killed = run(store, inputs)
    assert isinstance(killed.exception, Killed)
    assert len(list((Path(store.root) / "solve-dataset").glob("*.checkpoint.pt"))) == 1
    assert not [ref for ref in store.artifacts() if ref.stage == "solve-dataset"]
    monkeypatch.setattr(stage, "save_checkpoint", original)
    resumed = run(store, inputs, "--manifest", tmp_path / "resumed.json", "--manifest", tmp_path / "resumed1.json")
    assert resumed.exit_code == 0 and "resuming at epoch 1 of 3" in resumed.output
    assert read_ref(tmp_path / "resumed.json") == read_ref(tmp_path / "straight.json")
    np.testing.assert_array_equal(store.open(read_ref(tmp_path / "resumed.json"))["items/img0/X"][...], expected)


def test_solve_dataset_cli_errors_are_one_line(tmp_path):
    store = Store(tmp_path / "store")
    inputs = [write_manifest(tmp_path / f"extract{i}.json", store, ref) for i, ref in enumerate(fake_shards(store, 1))]
    mismatch = lds("solve-dataset", "--input", inputs[0], "--store", store.root, "--manifest", tmp_path / "a.json",
                   "--manifest", tmp_path / "b.json")
    assert mismatch.exit_code != 0 and "one --manifest per --input" in mismatch.output
    too_fine = lds("solve-dataset", "--input", inputs[0], "--resolution", 2, "--store", store.root)
    assert too_fine.exit_code != 0 and "no attention layer at 2x2 or coarser" in too_fine.output
    assert "Traceback" not in too_fine.output
    finer = lds("solve-dataset", "--input", inputs[0], "--resolution", 4, "--layers", "block01,block02", "--store", store.root)
    assert finer.exit_code != 0 and "layer 'block02' is not among the layers at the solver's resolution or coarser: block00, block01" in finer.output
