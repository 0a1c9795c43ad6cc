"""pipeline.solve.per_image against dense numpy references, gradcheck and a planted partition (METHOD.md 1, 2, 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.sparse.linalg import eigsh

from pipeline.decode.kmeans import kmeans_labels
from pipeline.extract.core import LayerAttention
from pipeline.evaluate.metrics import confusion_matrix, matched_scores
from pipeline.solve.graphs import GraphSet, Workspace, graph_sets
from pipeline.solve.per_image import AttentionBuffer, ExactOperator, exact_solution, finest_grid, objective, orthogonalise, solve_adam, solve_exact
from pipeline.solve.params import GraphOptions, SolverParams, resolve_accumulate
from pipeline.solve.stage import read_layer_sets, solve_image


def key_query_graphs(layers: list[LayerAttention]) -> list[GraphSet]:
    return graph_sets(layers, GraphOptions())


# ---------------------------------------------------------------------------------------------- helpers


def random_graph_set(grid: tuple[int, int], graphs: int, rng: np.random.Generator, dtype=torch.float32) -> GraphSet:
    n = grid[0] * grid[1]
    logits = torch.from_numpy(rng.normal(scale=2.0, size=(graphs, n, n)))
    return GraphSet(grid, torch.softmax(logits, dim=-1).to(dtype), [f"g{grid}/{i}" for i in range(graphs)])


def block_mean(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(m, H, W) average-pooled to ``grid`` by plain reshaping (grids divide evenly)."""
    m, height, width = x.shape
    return x.reshape(m, grid[0], height // grid[0], grid[1], width // grid[1]).mean(axis=(2, 4))


def reference_objective(x: np.ndarray, graph_sets: list[GraphSet], w_e: float, w_o: float):
    """METHOD.md section 2, written out densely with numpy."""
    eigenvalues, orthogonality = [], []
    m = x.shape[0]
    for gs in graph_sets:
        z = block_mean(x, gs.grid).reshape(m, -1).T  # (N, m), tokens in row-major (y, x) order
        z = z / np.linalg.norm(z, axis=0, keepdims=True)
        gram = z.T @ z
        ortho = (gram[~np.eye(m, dtype=bool)] ** 2).mean()
        for a in gs.matrices.double().numpy():
            eigenvalues.append(np.diag(z.T @ a @ z))
            orthogonality.append(ortho)
    eigenvalues, orthogonality = np.array(eigenvalues), np.array(orthogonality)
    loss = w_e * np.abs(eigenvalues - 1).mean() + w_o * orthogonality.mean()
    return loss, eigenvalues, orthogonality


def min_cos2(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest squared cosine of the principal angles between the column spaces (1 = b's span inside a's)."""
    return float(np.cos(subspace_angles(a, b)).min() ** 2)


def pooling_matrix(fine: tuple[int, int], coarse: tuple[int, int]) -> np.ndarray:
    """P (N_coarse, N_fine): averaging fine cells into the coarse cell that contains them."""
    fy, fx = fine[0] // coarse[0], fine[1] // coarse[1]
    p = np.zeros((coarse[0] * coarse[1], fine[0] * fine[1]))
    for y in range(fine[0]):
        for x in range(fine[1]):
            p[(y // fy) * coarse[1] + x // fx, y * fine[1] + x] = 1 / (fy * fx)
    return p


def dense_operator(graph_sets: list[GraphSet]) -> np.ndarray:
    """sum_l P_lᵀ (A_l + A_lᵀ)/2 P_l on the finest grid, built explicitly."""
    grid = finest_grid(graph_sets)
    n = grid[0] * grid[1]
    total = np.zeros((n, n))
    for gs in graph_sets:
        a = gs.matrices.double().numpy()
        s = ((a + a.transpose(0, 2, 1)) / 2).sum(0)
        p = np.eye(n) if gs.grid == grid else pooling_matrix(grid, gs.grid)
        total += p.T @ s @ p
    return total


# a planted partition of an 8x8 grid into 3 regions of 32, 16 and 16 tokens, aligned with 2x2 cells
REGIONS = np.zeros((8, 8), dtype=np.int64)
REGIONS[:, 4:] = 1
REGIONS[4:, :4] = 2


def planted_layers(rng: np.random.Generator, noise: float = 0.03) -> list[LayerAttention]:
    """Queries and keys that attend (almost) only within the own region: block-structured attention."""
    layers = []
    for name, regions, strength in [("fine", REGIONS, 8.0), ("coarse", REGIONS[::2, ::2], 6.0)]:
        onehot = np.eye(3)[regions]  # (h, w, 3)
        heads = 2
        q = np.stack([strength * onehot + noise * rng.normal(size=onehot.shape) for _ in range(heads)])
        k = np.stack([onehot + noise * rng.normal(size=onehot.shape) for _ in range(heads)])
        layers.append(LayerAttention(name, q, k, k.copy(), 1.0))
    return layers


def indicators(regions: np.ndarray) -> np.ndarray:
    return np.stack([(regions == r).ravel().astype(np.float64) for r in np.unique(regions)], axis=1)


def matched_miou(labels: np.ndarray, regions: np.ndarray) -> float:
    k = int(max(labels.max(), regions.max())) + 1
    return matched_scores(confusion_matrix(regions.ravel(), labels.ravel(), k, k))["miou"]


# ------------------------------------------------------------------------------------------------ graphs


def test_key_query_graphs_are_row_stochastic_softmax_grouped_by_resolution():
    rng = np.random.default_rng(0)
    layers = [
        LayerAttention("a", rng.normal(size=(2, 4, 6, 8)), rng.normal(size=(2, 4, 6, 8)), rng.normal(size=(2, 4, 6, 8)), 0.3),
        LayerAttention("b", rng.normal(size=(3, 2, 3, 8)), rng.normal(size=(3, 2, 3, 8)), rng.normal(size=(3, 2, 3, 8)), 0.5),
        LayerAttention("c", rng.normal(size=(2, 4, 6, 8)), rng.normal(size=(2, 4, 6, 8)), rng.normal(size=(2, 4, 6, 8)), 0.3),
    ]
    sets = {gs.grid: gs for gs in key_query_graphs(layers)}
    assert set(sets) == {(4, 6), (2, 3)}
    assert sets[(4, 6)].names == ["a/head0", "a/head1", "c/head0", "c/head1"]
    assert sets[(2, 3)].matrices.shape == (3, 6, 6)
    # head 1 of layer c, recomputed with numpy
    q, k = layers[2].q[1].reshape(24, 8), layers[2].k[1].reshape(24, 8)
    logits = q @ k.T * 0.3
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(sets[(4, 6)].matrices[3].numpy(), expected, rtol=1e-5, atol=1e-6)
    for gs in sets.values():
        np.testing.assert_allclose(gs.matrices.sum(-1).numpy(), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("weights", [(2.0, 2.0), (1.0, 0.5)])
def test_objective_matches_dense_numpy_reference_on_two_resolutions(weights):
    rng = np.random.default_rng(1)
    graph_sets = [random_graph_set((4, 6), 3, rng), random_graph_set((2, 3), 2, rng)]
    x = torch.softmax(torch.from_numpy(rng.normal(size=(5, 4, 6))).float(), dim=0)
    loss, eig, ortho = objective(x, graph_sets, *weights)
    ref_loss, ref_eig, ref_ortho = reference_objective(x.double().numpy(), graph_sets, *weights)
    assert eig.shape == (5, 5) and ortho.shape == (5,)
    np.testing.assert_allclose(eig.numpy(), ref_eig, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ortho.numpy(), ref_ortho, rtol=1e-4, atol=1e-7)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)


def test_objective_is_zero_for_disjoint_indicators_of_invariant_blocks():
    # block-diagonal row-stochastic A: indicators of the blocks are exact eigenvectors with eigenvalue 1
    a = torch.zeros(16, 16)
    a[:8, :8] = 1 / 8
    a[8:, 8:] = 1 / 8
    x = torch.zeros(2, 4, 4)
    x[0, :2] = 1  # tokens 0..7 (rows 0-1)
    x[1, 2:] = 1
    loss, eig, ortho = objective(x, [GraphSet((4, 4), a[None], ["a"])], 2.0, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(eig.numpy(), [[1.0, 1.0]], atol=1e-6)
    assert ortho.item() == pytest.approx(0.0, abs=1e-12)


def test_objective_gradcheck_float64():
    rng = np.random.default_rng(2)
    graph_sets = [random_graph_set((4, 4), 2, rng, torch.float64), random_graph_set((2, 2), 1, rng, torch.float64)]
    x = torch.from_numpy(rng.uniform(0.1, 1.0, size=(3, 4, 4))).requires_grad_()
    loss, eig, ortho = objective(x, graph_sets, 2.0, 2.0)
    assert loss.dtype == eig.dtype == ortho.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: objective(t, graph_sets, 2.0, 2.0), (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------- solutions


def test_orthogonalise_gives_orthogonal_components_in_decreasing_order_with_the_same_token_gram():
    x = np.random.default_rng(3).uniform(size=(4, 5, 6)).astype(np.float32)
    out = orthogonalise(x)
    flat = out.reshape(4, -1).astype(np.float64)
    gram = flat @ flat.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5)
    assert np.all(np.diff(np.diag(gram)) <= 1e-6)
    normalised = x.reshape(4, -1).astype(np.float64)
    normalised /= np.linalg.norm(normalised, axis=1, keepdims=True)
    np.testing.assert_allclose(flat.T @ flat, normalised.T @ normalised, atol=1e-5)


def test_solve_exact_matches_eigsh_on_the_dense_operator_single_resolution():
    rng = np.random.default_rng(4)
    layers = [
        LayerAttention(f"l{i}", 2 * rng.normal(size=(2, 6, 6, 4)), rng.normal(size=(2, 6, 6, 4)),
                       rng.normal(size=(2, 6, 6, 4)), 0.5)
        for i in range(2)
    ]
    graph_sets = key_query_graphs(layers)
    k = 4
    dense = dense_operator(graph_sets)
    values, vectors = eigsh(dense, k=k + 1, which="LA")
    values, vectors = values[::-1], vectors[:, ::-1]
    assert values[k - 1] - values[k] > 0.05  # a gap, so the leading subspace is well defined
    u, eigenvalues = solve_exact(graph_sets, SolverParams(channels=k))
    flat = u.reshape(k, -1).T.astype(np.float64)
    np.testing.assert_allclose(flat.T @ flat, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(eigenvalues, values[:k], rtol=1e-6)  # in decreasing order
    np.testing.assert_allclose(np.diag(flat.T @ dense @ flat), values[:k], rtol=1e-4)
    assert min_cos2(flat, vectors[:, :k]) > 0.9999
    # the same operator built from the layers themselves, summed or streamed block by block
    for limit in (10_000, 0):
        u_layers, values_layers = solve_exact(ExactOperator.from_layers(layers, GraphOptions(), dense_limit=limit), SolverParams(channels=k))
        np.testing.assert_allclose(values_layers, values[:k], rtol=1e-5)
        assert min_cos2(u_layers.reshape(k, -1).T, vectors[:, :k]) > 0.9999
    solution = exact_solution(u, layers, GraphOptions())
    # X_ortho keeps the eigenvalue order: its leading components span the leading eigenvectors
    for j in range(1, k + 1):
        assert min_cos2(solution.x_ortho.reshape(k, -1)[:j].T, vectors[:, :j]) > 0.999
    assert solution.eigenvalues.shape == (4, k) and solution.losses.shape == (0,)
    # the streamed eigenvalue / orthogonality terms equal the dense objective's
    _, eig, ortho = objective(torch.from_numpy(u), graph_sets, 2.0, 2.0)
    np.testing.assert_allclose(solution.eigenvalues, eig.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(solution.orthogonality, ortho.numpy(), rtol=1e-4, atol=1e-9)


def test_solve_exact_two_resolutions_matches_explicit_pooling_operator():
    rng = np.random.default_rng(5)
    graph_sets = [random_graph_set((4, 6), 2, rng), random_graph_set((2, 3), 2, rng)]
    k = 3
    values, vectors = np.linalg.eigh(dense_operator(graph_sets))
    values, vectors = values[::-1], vectors[:, ::-1]
    assert values[k - 1] - values[k] > 0.02
    u = solve_exact(graph_sets, SolverParams(channels=k))[0].reshape(k, -1).T
    assert min_cos2(u, vectors[:, :k]) > 0.999


# -------------------------------------------------------------------------------------- planted partition


@pytest.fixture(scope="module")
def planted_graphs():
    return key_query_graphs(planted_layers(np.random.default_rng(6)))


def test_attention_of_planted_layers_is_block_structured(planted_graphs):
    fine = next(gs for gs in planted_graphs if gs.grid == (8, 8)).matrices.numpy()
    same = REGIONS.ravel()[:, None] == REGIONS.ravel()[None, :]
    within = (fine * same).sum(-1)
    assert within.min() > 0.95


def test_solve_exact_leading_components_contain_the_partition(planted_graphs):
    # more channels than regions: the leading 3 components (not just any 3) must hold the indicators
    u, _ = solve_exact(planted_graphs, SolverParams(channels=6))
    assert min_cos2(u.reshape(6, -1)[:3].T, indicators(REGIONS)) > 0.95
    labels = kmeans_labels(u[:3], 3)
    assert matched_miou(labels, REGIONS) > 0.9


def test_solve_adam_recovers_the_partition(planted_graphs):
    params = SolverParams(channels=4, steps=300, lr=1e-2, seed=0, parameterisation="free")
    solution = solve_adam(planted_graphs, params)
    assert solution.x.shape == (4, 8, 8) and solution.x_ortho.shape == (4, 8, 8)
    assert solution.x.min() >= 0
    np.testing.assert_allclose(solution.x.sum(0), 1.0, rtol=1e-5)  # softmax over channels
    assert solution.losses.shape == (300,) and solution.losses[-1] < 0.5 * solution.losses[0]
    assert len(solution.graph_names) == solution.eigenvalues.shape[0] == 4
    assert min_cos2(solution.x_ortho.reshape(4, -1)[:3].T, indicators(REGIONS)) > 0.95
    labels = kmeans_labels(solution.x_ortho, 3)
    assert matched_miou(labels, REGIONS) > 0.9


def test_solve_adam_is_deterministic_for_a_seed(planted_graphs):
    runs = [solve_adam(planted_graphs, SolverParams(channels=3, steps=40, lr=1e-2, seed=s)) for s in (7, 7, 8)]  # conv net
    np.testing.assert_array_equal(runs[0].x, runs[1].x)
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    assert not np.array_equal(runs[0].x, runs[2].x)


def test_solve_adam_with_the_conv_net_parameterisation_recovers_the_partition(planted_graphs):
    params = SolverParams(channels=4, steps=150, lr=1e-2, seed=0, parameterisation="convnet")
    solution = solve_adam(planted_graphs, params)
    np.testing.assert_allclose(solution.x.sum(0), 1.0, rtol=1e-5)
    assert solution.losses[-1] < 0.5 * solution.losses[0]
    assert matched_miou(kmeans_labels(solution.x_ortho, 3), REGIONS) > 0.9


def test_warm_start_from_the_exact_solver_begins_near_the_solution(planted_graphs):
    u, _ = solve_exact(planted_graphs, SolverParams(channels=4))
    cold = solve_adam(planted_graphs, SolverParams(channels=4, steps=5, lr=1e-2, parameterisation="free"))
    warm = solve_adam(planted_graphs, SolverParams(channels=4, steps=5, lr=1e-2, parameterisation="free", init="exact"), init=u)
    assert warm.losses[0] < cold.losses[0]
    assert matched_miou(kmeans_labels(warm.x_ortho, 3), REGIONS) > 0.9


class RecordingPool:
    """A pool of ``size`` attention sets whose builders record, at each build, whether the set was buffered."""

    def __init__(self, size: int):
        self.built: list[int] = []
        self.rebuilt_while_buffered: list[int] = []
        self.buffer: AttentionBuffer | None = None
        self.builders = [self.builder(index) for index in range(size)]

    def builder(self, index: int):
        def build() -> list[GraphSet]:
            if index in self.buffer.sets:
                self.rebuilt_while_buffered.append(index)
            self.built.append(index)
            return [GraphSet((1, 1), torch.ones(1, 1, 1), [f"t{index}"])]
        return build

    def attach(self, size: int, refresh: float, seed: int) -> AttentionBuffer:
        self.buffer = AttentionBuffer(self.builders, size=size, refresh=refresh, seed=seed)
        return self.buffer


def drawn_index(sets: list[GraphSet]) -> int:
    return int(sets[0].names[0][1:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_buffer_refreshes_with_unbuffered_sets_evicts_the_oldest_and_uses_the_whole_pool(seed):
    pool = RecordingPool(12)
    buffer = pool.attach(size=5, refresh=0.25, seed=seed)
    expected: list[int] = []  # the buffer's contents, oldest first, kept by hand
    drawn: list[int] = []
    draws = 4000
    for _ in range(draws):
        before = len(pool.built)
        index = drawn_index(buffer.draw())
        drawn.append(index)
        if len(pool.built) > before:  # a refresh: the new set enters, the oldest leaves a full buffer
            assert pool.built[-1] == index
            expected.append(index)
            expected = expected[-5:]
        else:  # a reuse: a set already buffered
            assert index in expected
        assert list(buffer.sets) == expected and len(buffer.sets) <= 5
    assert pool.rebuilt_while_buffered == []  # (a) a refresh never re-draws a buffered set
    assert len(buffer.sets) == 5  # (b) filled, never beyond
    refreshes = len(pool.built) - 1  # the first draw fills the empty buffer without a coin
    assert abs(refreshes / (draws - 1) - 0.25) < 0.03  # (c) ~1/4 (4 standard deviations: 0.027)
    assert set(pool.built) == set(range(12))  # (d) every pool member used
    replay = RecordingPool(12).attach(size=5, refresh=0.25, seed=seed)
    assert [drawn_index(replay.draw()) for _ in range(draws)] == drawn  # deterministic for a seed


def test_attention_buffer_with_refresh_1_brings_a_new_set_every_pass():
    pool = RecordingPool(8)
    buffer = pool.attach(size=3, refresh=1.0, seed=0)
    drawn = [drawn_index(buffer.draw()) for _ in range(300)]
    assert len(pool.built) == 300 and pool.rebuilt_while_buffered == []
    assert all(len(set(drawn[i:i + 4])) == 4 for i in range(len(drawn) - 3))  # never one of the 3 buffered


def test_attention_buffer_with_refresh_0_keeps_the_first_set():
    pool = RecordingPool(8)
    buffer = pool.attach(size=5, refresh=0.0, seed=0)
    assert len({drawn_index(buffer.draw()) for _ in range(100)}) == 1 and len(pool.built) == 1


def test_attention_buffer_over_a_pool_no_larger_than_itself_builds_each_set_once():
    pool = RecordingPool(3)
    buffer = pool.attach(size=5, refresh=0.25, seed=0)
    drawn = [drawn_index(buffer.draw()) for _ in range(400)]
    assert sorted(pool.built) == [0, 1, 2] and set(drawn) == {0, 1, 2}  # once all are buffered, only reuse
    single = AttentionBuffer([pool.builders[0]], refresh=1.0)
    pool.buffer = single
    assert all(single.draw() is single.draw() for _ in range(5))
    with pytest.raises(ValueError, match="size 0 must be >= 1"):
        AttentionBuffer(pool.builders, size=0)


def test_accumulate_auto_is_20_passes_for_several_attention_sets_and_1_for_one(planted_graphs):
    assert resolve_accumulate("auto", 20) == resolve_accumulate("auto", 2) == 20
    assert resolve_accumulate("auto", 1) == 1 and resolve_accumulate(3, 20) == 3
    with pytest.raises(ValueError, match="expected auto or an integer"):
        resolve_accumulate(0, 1)
    params = SolverParams(channels=3, steps=2, seed=0)
    assert params.accumulate == "auto"
    for sets, passes in ((1, 1), (6, 20)):
        buffer = AttentionBuffer([lambda: planted_graphs] * sets, params.buffer, params.refresh)
        draws = []
        original = buffer.draw
        buffer.draw = lambda: draws.append(1) or original()
        solve_adam(buffer, params)
        assert len(draws) == 1 + params.steps * passes  # one draw sets up X, then `passes` per step


def test_read_layer_sets_splits_timesteps_into_attention_sets(tmp_path):
    import zarr

    rng = np.random.default_rng(9)
    item = zarr.open_group(tmp_path / "item.zarr", mode="w")
    for name, timesteps in (("down", True), ("up", True)):
        group = item.create_group(f"layers/{name}")
        group.attrs.update({"scale": 0.5, "timesteps": [101, 41, 7]})
        for part in ("q", "k", "v"):
            group.create_array(part, data=rng.normal(size=(3, 2, 4, 4, 5)).astype(np.float16))
    sets = read_layer_sets(item)
    assert [[layer.name for layer in layers] for layers in sets] == [
        ["down@t101", "up@t101"], ["down@t41", "up@t41"], ["down@t7", "up@t7"]
    ]
    np.testing.assert_array_equal(sets[1][0].q, item["layers/down/q"][1])
    assert sets[2][1].q.shape == (2, 4, 4, 5) and sets[0][0].scale == 0.5


# ----------------------------------------------------------------------------- lds solve's work, per image


@pytest.mark.parametrize("solver, kind", [("exact", "kq"), ("exact", "vv"), ("adam", "kq")])
def test_solve_image_on_planted_attention_gives_x_ortho_whose_kmeans_recovers_the_regions(solver, kind):
    """`lds solve`'s work on one image, called directly: the arrays and attributes it stores, and a known
    answer (the planted regions) from K-Means on X_ortho, as `lds decode` clusters it."""
    layer_sets = [planted_layers(np.random.default_rng(6))]
    params = SolverParams(solver=solver, kind=kind, channels=4, steps=150, lr=1e-2, parameterisation="free")
    arrays, attrs = solve_image(layer_sets, params)
    assert set(arrays) == {"X", "X_ortho", "U", "eigenvalues", "orthogonality", "losses", "layer_xy_r2"}
    assert arrays["X_ortho"].data.shape == (4, 8, 8) and arrays["X_ortho"].dims == ("component", "y", "x")
    assert attrs == {"graphs": ["fine/head0", "fine/head1", "coarse/head0", "coarse/head1"], "layers": ["fine", "coarse"],
                     "device": "cpu", "attention_sets": 1}
    assert arrays["eigenvalues"].data.shape == (4, 4) and arrays["layer_xy_r2"].data.shape == (2,)
    assert arrays["losses"].data.shape == ((150,) if solver == "adam" else (0,))
    assert matched_miou(kmeans_labels(arrays["X_ortho"].data, 3), REGIONS) > 0.9


def test_solve_image_selects_layers_and_heads_and_takes_every_attention_set():
    layers = planted_layers(np.random.default_rng(6))
    arrays, attrs = solve_image([layers], SolverParams(solver="exact", channels=3, layers=("-1",), heads=(1,)))
    assert attrs["graphs"] == ["coarse/head1"] and attrs["layers"] == ["coarse"] and arrays["X"].data.shape == (3, 4, 4)
    timesteps = [[LayerAttention(f"{layer.name}@t{t}", layer.q, layer.k, layer.v, 1.0) for layer in layers] for t in (5, 9)]
    arrays, attrs = solve_image(timesteps, SolverParams(channels=4, steps=5, accumulate=2, parameterisation="free"))
    assert attrs["attention_sets"] == 2 and attrs["layers"] == ["fine", "coarse"]  # each layer's R² from the first set
    assert attrs["graphs"][0] in ("fine@t5/head0", "fine@t9/head0") and arrays["losses"].data.shape == (5,)


@pytest.mark.parametrize("kind", ["kq", "vv"])
def test_a_workspace_shared_by_images_of_different_sizes_gives_each_the_solution_of_fresh_memory(kind):
    """`lds solve` passes one Workspace to every image: a larger image grows its memory, a smaller one
    reuses part of it, and neither sees the other's graphs."""
    rng = np.random.default_rng(8)
    small = planted_layers(rng)
    large = [LayerAttention(layer.name, *(np.concatenate([a, a[:, ::-1]], axis=2) for a in (layer.q, layer.k, layer.v)), 1.0)
             for layer in planted_layers(rng)]  # a 16 x 8 grid
    params = SolverParams(solver="exact", kind=kind, channels=4)
    workspace = Workspace()
    for layers in (small, large, small):
        fresh, _ = solve_image([layers], params)
        reused, _ = solve_image([layers], params, workspace=workspace)
        for name in ("X_ortho", "eigenvalues", "layer_xy_r2"):
            np.testing.assert_array_equal(reused[name].data, fresh[name].data)


def test_solve_image_without_layer_diagnostics_stores_the_same_solution_without_the_diagnostics():
    layer_sets = [planted_layers(np.random.default_rng(6))]
    full, full_attrs = solve_image(layer_sets, SolverParams(solver="exact", channels=4))
    params = SolverParams(solver="exact", channels=4, layer_diagnostics=False)
    lean, lean_attrs = solve_image(layer_sets, params)
    assert set(full) - set(lean) == {"layer_xy_r2", "eigenvalues", "orthogonality"} and "layers" not in lean_attrs
    assert lean_attrs["graphs"] == full_attrs["graphs"]
    np.testing.assert_array_equal(lean["X_ortho"].data, full["X_ortho"].data)
    rng = np.random.default_rng(9)  # graphs built into memory reused from image to image, of two sizes: the same X
    large = [LayerAttention(layer.name, *(np.concatenate([a, a[:, ::-1]], axis=2) for a in (layer.q, layer.k, layer.v)), 1.0)
             for layer in planted_layers(rng)]
    workspace = Workspace()
    for layers in (layer_sets[0], large, layer_sets[0]):
        reused, _ = solve_image([layers], params, workspace=workspace)
        np.testing.assert_array_equal(reused["X_ortho"].data, solve_image([layers], params)[0]["X_ortho"].data)
    adam, _ = solve_image(layer_sets, SolverParams(solver="adam", channels=4, steps=5, layer_diagnostics=False))
    assert "eigenvalues" in adam and "layer_xy_r2" not in adam  # Adam's objective measures them anyway
    assert params.artifact_params() == {**SolverParams(solver="exact", channels=4).artifact_params(), "layer_diagnostics": False}
    assert "layer_diagnostics" not in SolverParams().artifact_params()  # the default's artifact keys are unchanged
