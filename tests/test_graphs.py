"""pipeline.solve.graphs: kq / vv graphs, random-walk / laplacian normalisation, selection, row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.solve.graphs as graphs
from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention
from pipeline.solve.graphs import GraphCache, apply_symmetrised, graph_sets, row_blocks, select, summed_symmetrised
from pipeline.solve.per_image import objective
from pipeline.solve.params import GraphOptions


def random_layer(name: str, rng: np.random.Generator, heads: int = 2, grid=(3, 4), dim: int = 5) -> LayerAttention:
    shape = (heads, *grid, dim)
    return LayerAttention(name, rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape), 0.4)


def numpy_graph(layer: LayerAttention, head: int, kind: str, variant: str) -> tuple[np.ndarray, np.ndarray | None]:
    """METHOD.md section 1 written out densely: (matrix, sqrt-degree or None)."""
    q, k, v = (a[head].reshape(-1, a.shape[-1]) for a in (layer.q, layer.k, layer.v))
    if kind == "kq":
        logits = q @ k.T * layer.scale
    else:
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        logits = unit @ unit.T
    if variant == "random-walk":
        weights = np.exp(logits) if kind == "kq" else np.maximum(logits, 0)
        return weights / weights.sum(1, keepdims=True), None
    weights = (np.exp(logits) + np.exp(logits).T) / 2
    degree = weights.sum(1)
    return weights / np.sqrt(np.outer(degree, degree)), np.sqrt(degree)


@pytest.mark.parametrize("kind", ["kq", "vv"])
@pytest.mark.parametrize("variant", ["random-walk", "laplacian"])
def test_graphs_match_dense_numpy_definitions(kind, variant):
    layer = random_layer("a", np.random.default_rng(0))
    (graph_set,) = graph_sets([layer], GraphOptions(kind, variant))
    for head in range(2):
        expected, root = numpy_graph(layer, head, kind, variant)
        np.testing.assert_allclose(graph_set.matrices[head].numpy(), expected, rtol=1e-4, atol=1e-6)
        if root is None:
            assert graph_set.scale is None
            np.testing.assert_allclose(graph_set.matrices[head].sum(-1).numpy(), 1.0, rtol=1e-5)
        else:
            # the scale cancels up to a constant: sqrt(D) / ||sqrt(D)|| is N's leading eigenvector, eigenvalue 1
            scale = graph_set.scale[head].double().numpy()
            np.testing.assert_allclose(scale / np.linalg.norm(scale), root / np.linalg.norm(root), rtol=1e-5)
            values = np.linalg.eigvalsh(expected)
            assert values[-1] == pytest.approx(1.0, abs=1e-6)


def test_vv_random_walk_has_no_negative_weights_and_self_loops_dominate():
    (graph_set,) = graph_sets([random_layer("a", np.random.default_rng(1))], GraphOptions("vv"))
    matrices = graph_set.matrices.numpy()
    assert matrices.min() >= 0
    diagonal = np.diagonal(matrices, axis1=1, axis2=2)
    assert np.all(diagonal >= matrices.max(-1) - 1e-6)  # cosine with itself is the largest


@pytest.mark.parametrize("variant", ["random-walk", "laplacian"])
def test_row_blocks_give_the_same_graph_however_small_the_blocks(monkeypatch, variant):
    layer = random_layer("a", np.random.default_rng(2), heads=3, grid=(5, 5))
    options = GraphOptions("kq", variant)
    whole = graph_sets([layer], options)[0].matrices
    monkeypatch.setattr(graphs, "BLOCK_ELEMENTS", 3 * 25 * 4)  # 4 rows per block
    blocked = graph_sets([layer], options)[0].matrices
    np.testing.assert_allclose(blocked.numpy(), whole.numpy(), rtol=1e-5, atol=1e-7)
    symmetric = ((whole + whole.transpose(1, 2)) / 2).sum(0).double()
    np.testing.assert_allclose(summed_symmetrised(layer, options).numpy(), symmetric.numpy(), rtol=1e-5)
    vectors = torch.from_numpy(np.random.default_rng(3).normal(size=(25, 3))).float()
    np.testing.assert_allclose(apply_symmetrised(layer, options, vectors).numpy(),
                               (symmetric.float() @ vectors).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["random-walk", "laplacian"])
def test_graph_cache_builds_each_layer_once_while_within_its_budget(monkeypatch, variant):
    rng = np.random.default_rng(6)
    small, large = random_layer("a", rng, heads=2, grid=(3, 4)), random_layer("b", rng, heads=2, grid=(5, 5))
    options = GraphOptions("kq", variant)
    expected = {layer.name: (summed_symmetrised(layer, options), graph_sets([layer], options)[0].matrices) for layer in (small, large)}
    built = []
    monkeypatch.setattr(graphs, "row_blocks", lambda layer, *args: built.append(layer.name) or row_blocks(layer, *args))
    cache = GraphCache(options, budget=4 * 2 * 12**2)  # the small layer's graphs: the large one's do not fit
    for layer in (small, large, small, large):
        summed, matrices = expected[layer.name]
        np.testing.assert_array_equal(summed_symmetrised(layer, options, blocks=cache.row_blocks).numpy(), summed.numpy())
        np.testing.assert_array_equal(torch.cat([block for _, block, _ in cache.row_blocks(layer)], 1).numpy(), matrices.numpy())
    assert list(cache.blocks) == ["a"]
    assert built == ["a", "b", "b", "b", "b"]  # the large layer's graphs are built again each time


@pytest.mark.parametrize("kind", ["kq", "vv"])
def test_summed_symmetrised_over_several_layers_is_the_sum_of_each_layers(kind):
    rng = np.random.default_rng(9)
    layers = [random_layer(name, rng, heads=3, grid=(4, 5)) for name in "abc"]
    options = GraphOptions(kind)
    each = sum(summed_symmetrised(layer, options) for layer in layers)
    np.testing.assert_allclose(summed_symmetrised(layers, options, workspace=graphs.Workspace()).numpy(), each.numpy(), rtol=1e-6)  # summed in float32


def test_laplacian_objective_matches_numpy_and_is_differentiable():
    rng = np.random.default_rng(4)
    layers = [random_layer("a", rng, grid=(4, 4)), random_layer("b", rng, grid=(2, 2))]
    options = GraphOptions("kq", "laplacian")
    sets = graph_sets(layers, options)
    x = torch.from_numpy(rng.uniform(0.1, 1.0, size=(3, 4, 4)))
    _, eig, ortho = objective(x.float(), sets, 2.0, 2.0)
    for index, (layer, head) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        matrix, root = numpy_graph(layers[layer], head, "kq", "laplacian")
        grid = layers[layer].grid
        pooled = x.numpy().reshape(3, grid[0], 4 // grid[0], grid[1], 4 // grid[1]).mean(axis=(2, 4)).reshape(3, -1).T
        z = root[:, None] * pooled
        z /= np.linalg.norm(z, axis=0)
        np.testing.assert_allclose(eig[index].numpy(), np.diag(z.T @ matrix @ z), rtol=1e-4)
        gram = z.T @ z
        assert ortho[index].item() == pytest.approx((gram[~np.eye(3, dtype=bool)] ** 2).mean(), rel=1e-4)
    double = [graphs.GraphSet(gs.grid, gs.matrices.double(), gs.names, gs.scale.double()) for gs in sets]
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: objective(t, double, 2.0, 2.0), (x,), eps=1e-6, atol=1e-5)


def test_select_layers_by_name_or_index_and_heads():
    rng = np.random.default_rng(5)
    layers = [random_layer(name, rng, heads=3) for name in ("block00", "block01", "block02")]
    chosen = select(layers, GraphOptions(layers=("block02", "0"), heads=(2,)))
    assert [layer.name for layer in chosen] == ["block02", "block00"]
    np.testing.assert_array_equal(chosen[0].q, layers[2].q[[2]])
    names = graph_sets(layers, GraphOptions(layers=("-1",), heads=(0, 2)))[0].names
    assert names == ["block02/head0", "block02/head2"]
    with pytest.raises(LdsError, match="layer 'block09' is not stored; stored layers: block00, block01, block02"):
        select(layers, GraphOptions(layers=("block09",)))
    with pytest.raises(LdsError, match="head 3 does not exist"):
        select(layers, GraphOptions(heads=(3,)))


def test_a_stable_diffusion_layer_is_selected_by_its_stored_name_or_with_its_timestep():
    rng = np.random.default_rng(6)
    layers = [random_layer(f"{name}@t219", rng, heads=2) for name in ("00-down0.0.t0", "02-mid0.t0")]
    assert select(layers, GraphOptions(layers=("02-mid0.t0",))) == [layers[1]]
    assert select(layers, GraphOptions(layers=("00-down0.0.t0@t219",))) == [layers[0]]
    with pytest.raises(LdsError, match="stored layers: 00-down0.0.t0, 02-mid0.t0$"):
        select(layers, GraphOptions(layers=("mid",)))
