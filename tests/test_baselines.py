"""TokenCut / MaskCut baselines on planted affinities with known normalised cuts, and `lds baseline`
read unchanged by `lds decode` and `lds evaluate`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
from click.testing import CliRunner

from pipeline.solve.baselines import (
    DENSE_TOKENS, BaselineParams, artifact_tokens, attention_affinity, baseline_image, baseline_settings, degenerate_warning,
    feature_affinity, fill_from_neighbours, foreground, maskcut, ncut_eigenvectors, robust_z, run_baseline,
)
from pipeline.extract.core import LayerAttention
from stages.cli import cli

HEIGHT, WIDTH = 12, 14


def planted_objects(seed: int = 0, noise: float = 0.3) -> tuple[LayerAttention, np.ndarray]:
    """Background 0 and three separate objects of different sizes, none at a corner: one head whose key
    features are the region's own axis plus noise; returns the layer and the true regions."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    truth[2:5, 2:6] = 1
    truth[7:11, 3:6] = 2
    truth[3:9, 9:13] = 3
    keys = np.eye(8)[truth] * 3 + rng.normal(size=(HEIGHT, WIDTH, 8)) * noise
    return LayerAttention("block00", keys[None], keys[None], keys[None], 0.5), truth


@pytest.mark.parametrize("tokens", [30, DENSE_TOKENS + 30])  # dense and Lanczos
def test_eigenvectors_solve_the_generalised_problem_as_scipy_and_the_normalised_laplacian(tokens):
    rng = np.random.default_rng(1)
    w = rng.uniform(0.01, 1, size=(tokens, tokens))
    w = (w + w.T) / 2
    values, vectors = ncut_eigenvectors(w, 5)
    d = np.diag(w.sum(1))
    reference_values, reference = scipy.linalg.eigh(d - w, d)
    np.testing.assert_allclose(values, reference_values[1:6], atol=1e-10)
    np.testing.assert_allclose(np.abs(vectors.T @ d @ reference[:, 1:6]), np.eye(5), atol=1e-8)  # same up to sign
    # independently: x = D^-1/2 y for the eigenvectors y of the symmetric normalised Laplacian
    root = np.sqrt(w.sum(1))
    laplacian_values, y = np.linalg.eigh(np.eye(tokens) - w / np.outer(root, root))
    np.testing.assert_allclose(values, laplacian_values[1:6], atol=1e-10)
    np.testing.assert_allclose(np.abs(vectors.T @ d @ (y[:, 1:6] / root[:, None])), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(vectors.T @ d @ vectors, np.eye(5), atol=1e-10)  # D-orthonormal


def test_two_region_cut_is_recovered_exactly_and_the_smaller_side_is_foreground():
    truth = np.zeros((HEIGHT, WIDTH), dtype=bool)
    truth[3:8, 4:10] = True  # 30 of 168 tokens
    rng = np.random.default_rng(2)
    flat = truth.ravel()
    w = np.where(flat[:, None] == flat[None, :], 1.0, 0.05) + rng.uniform(0, 0.02, (flat.size, flat.size))
    w = (w + w.T) / 2
    _, vectors = ncut_eigenvectors(w, 1)
    for sign in (1, -1):  # whatever sign the solver returns
        np.testing.assert_array_equal(foreground(sign * vectors[:, 0], truth.shape, corner_rule=False), truth)


def test_corner_rule_turns_a_background_foreground_over():
    # the larger |value| lies on the background's side, which holds all four corners
    vector = np.where(np.pad(np.ones((4, 4), bool), 3), 0.4, -1.0).ravel()
    plain = foreground(vector, (10, 10), corner_rule=False)
    assert plain.sum() == 84 and plain[0, 0]
    turned = foreground(vector, (10, 10), corner_rule=True)
    np.testing.assert_array_equal(turned, np.pad(np.ones((4, 4), bool), 3))


def test_feature_affinity_is_binarised_cosine_similarity():
    features = np.array([[1.0, 0], [2, 0.1], [0, 1], [0, 0]])
    w = feature_affinity(features, 0.2, 1e-5)
    expected = np.array([[1, 1, 1e-5, 1e-5], [1, 1, 1e-5, 1e-5], [1e-5, 1e-5, 1, 1e-5], [1e-5] * 4])
    np.testing.assert_array_equal(w, expected)


def test_attention_affinity_is_the_mean_symmetrised_softmax():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 3, 4, 5, 6))
    layer = LayerAttention("block00", q, k, k, 0.4)
    logits = np.einsum("hyxd,hvud->hyxvu", q, k).reshape(3, 20, 20) * 0.4
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(attention_affinity(layer), ((attention + attention.transpose(0, 2, 1)) / 2).mean(0), atol=1e-6)


@pytest.mark.parametrize("affinity", ["features", "attention"])
def test_maskcut_finds_the_planted_objects(affinity):
    layer, truth = planted_objects()
    result = run_baseline(layer, BaselineParams("maskcut", affinity, eigenvectors=15, masks=3, tau=0.2))
    found = {next(c for c in (1, 2, 3) if (mask == (truth == c)).all()) for mask in result.masks if any((mask == (truth == c)).all() for c in (1, 2, 3))}
    assert found == {1, 2, 3} and len(result.masks) == 3
    np.testing.assert_allclose(result.scores, [1, 2 / 3, 1 / 3])
    assert result.x.shape == (15, HEIGHT, WIDTH) and np.all(np.diff(result.eigenvalues) >= 0)


def test_maskcut_cuts_the_tokens_left_drops_small_masks_and_tokencut_makes_one():
    layer, truth = planted_objects(seed=4)
    w = np.where(truth.ravel()[:, None] == truth.ravel()[None, :], 1.0, 1e-5)
    masks = maskcut(w, truth.shape, BaselineParams("maskcut", "features", eigenvectors=4, masks=5, tau=0.2))
    assert len(masks) == 5 and not np.any(np.sum(masks, axis=0) > 1)  # masks never share a token
    assert {int(np.unique(truth[m])[0]) for m in masks[:3]} == {1, 2, 3}  # one object each, all found
    assert all((m == (truth == truth[m][0])).all() for m in masks[:3])
    assert [m.sum() for m in masks[3:]] == [3, 3]  # the uniform background is cut anywhere ...
    small = maskcut(w, truth.shape, BaselineParams("maskcut", "features", eigenvectors=4, masks=5, tau=0.2, min_area=0.02))
    assert [m.sum() for m in small[3:]] == [0, 0]  # ... into pieces of 3 / 168 tokens: 1.8% of the image
    tokencut = run_baseline(layer, BaselineParams("tokencut", "features", eigenvectors=8, masks=1))
    assert len(tokencut.masks) == 1 and tokencut.x.shape == (8, HEIGHT, WIDTH)
    assert any((tokencut.masks[0] == (truth == c)).all() for c in (1, 2, 3))


def test_a_features_graph_joining_every_pair_is_flagged_and_centring_separates_it():
    layer, truth = planted_objects()
    separated = run_baseline(layer, BaselineParams("tokencut", "features", eigenvectors=4, masks=1, centre=False))
    assert 0.5 < separated.edges_above_tau < 0.7  # 54% of the pairs share a planted region, plus noise
    assert degenerate_warning([separated.edges_above_tau], 0.2) is None
    offset = LayerAttention("block00", layer.q, layer.k + 10.0, layer.v, 0.5)  # keys all alike: cosine > 0.2 everywhere
    alike = run_baseline(offset, BaselineParams("tokencut", "features", eigenvectors=4, masks=1, centre=False))
    assert alike.edges_above_tau == 1.0
    centred = run_baseline(offset, BaselineParams("maskcut", "features", eigenvectors=4, masks=3, tau=0.2))  # the mean key removed
    assert centred.edges_above_tau < 0.7
    assert sorted(int(np.unique(truth[m])[0]) for m in centred.masks) == [1, 2, 3]
    assert all((m == (truth == truth[m][0])).all() for m in centred.masks)
    warning = degenerate_warning([separated.edges_above_tau, alike.edges_above_tau, None], 0.2)
    assert warning.startswith("in 1 of 3 images the features graph joins 100% or more") and "--centre" in warning
    assert run_baseline(layer, BaselineParams("tokencut", "attention", eigenvectors=4, masks=1)).edges_above_tau is None


def test_robust_z_and_artifact_tokens_on_known_values():
    np.testing.assert_allclose(robust_z(np.array([1.0, 2, 3, 4, 100])), np.array([-2, -1, 0, 1, 97]) / 1.482602218505602)
    keys = np.zeros((10, 3))
    keys[:, 0] = [10, 10.5, 9.5, 10, 10.2, 9.8, 40, 10.1, 9.9, 12]  # median 10.05, MAD 0.2 -> 0.2965
    np.testing.assert_array_equal(np.flatnonzero(artifact_tokens(keys, 6.0)), [6, 9])  # z 101 and 6.58
    np.testing.assert_array_equal(np.flatnonzero(artifact_tokens(keys, 7.0)), [6])
    assert not artifact_tokens(keys, np.inf).any()


def test_fill_from_neighbours_copies_the_nearest_kept_token():
    kept = np.ones((3, 4), dtype=bool)
    kept[1, 1] = kept[0, 3] = False
    values = np.arange(12.0).reshape(3, 4)
    filled = fill_from_neighbours(values[kept], kept.ravel(), (3, 4)).reshape(3, 4)
    assert filled[1, 1] in (1, 4, 6, 9) and filled[0, 3] in (2, 7)  # a 4-neighbour's value (ties: any)
    np.testing.assert_array_equal(filled[kept], values[kept])


def with_artifacts(layer: LayerAttention) -> LayerAttention:
    """The planted layer with three high-norm keys in the background, pointing along an axis of their own
    (DINOv2's artifact tokens: alike among themselves, unlike every other token)."""
    keys = layer.k.copy()
    for y, x in [(6, 8), (11, 9), (0, 7)]:
        keys[0, y, x] = np.eye(8)[6] * 30
    return LayerAttention(layer.name, keys, keys, keys, layer.scale)


def planted_objects_found(masks: np.ndarray, truth: np.ndarray) -> list[int]:
    return [c for c in (1, 2, 3) if any((m == (truth == c)).all() for m in masks)]


@pytest.mark.parametrize("affinity, seed", [("features", 1), ("attention", 0)])
def test_high_norm_artifact_tokens_leave_the_graph_and_the_planted_objects_are_found(affinity, seed):
    clean, truth = planted_objects(seed)
    layer = with_artifacts(clean)
    plain = BaselineParams("tokencut", affinity, eigenvectors=4, masks=1, artifacts=np.inf)  # no detection
    assert planted_objects_found(run_baseline(layer, plain).masks, truth) == []  # the cut goes to the artifacts
    tokencut = run_baseline(layer, BaselineParams("tokencut", affinity, eigenvectors=4, masks=1))
    np.testing.assert_array_equal(np.argwhere(tokencut.artifacts), [(0, 7), (6, 8), (11, 9)])
    np.testing.assert_array_equal(tokencut.masks[0], truth == 3)
    assert np.isfinite(tokencut.x).all() and tokencut.x[:, 6, 8].tolist() == tokencut.x[:, 6, 7].tolist()  # filled
    maskcut_params = BaselineParams("maskcut", affinity, eigenvectors=4, masks=3, tau=0.2)
    found = planted_objects_found(run_baseline(layer, maskcut_params).masks, truth)
    missed = planted_objects_found(run_baseline(layer, replace(maskcut_params, artifacts=np.inf)).masks, truth)
    assert len(found) > len(missed) and (affinity == "features" or found == [1, 2, 3])


def test_defaults_are_the_methods_values_and_none_takes_the_methods_own():
    # METHOD.md section 5: m = 15 eigenvectors (TokenCut m = 8); TokenCut's tau 0.2, CutLER's MaskCut's 0.15 and N = 3
    assert (BaselineParams().method, BaselineParams().affinity, BaselineParams().layer) == ("tokencut", "attention", "-2")
    tokencut, maskcut_params = BaselineParams().resolved(), BaselineParams(method="maskcut").resolved()
    assert (tokencut.eigenvectors, tokencut.masks, tokencut.tau) == (8, 1, 0.2)
    assert (maskcut_params.eigenvectors, maskcut_params.masks, maskcut_params.tau) == (15, 3, 0.15)
    given = BaselineParams(method="maskcut", eigenvectors=4, masks=2, tau=0.0)
    assert given.resolved() == given  # what is given stays, a tau of 0 too
    assert baseline_settings(BaselineParams()) == {
        "method": "tokencut", "affinity": "attention", "layer": "-2", "eigenvectors": 8, "masks": 1, "tau": 0.2, "centre": True,
        "artifacts": 5.0, "eps": 1e-5, "min_area": 0.0}


def test_baseline_image_cuts_the_chosen_layer_and_stores_it_as_a_solve_would():
    layer, truth = planted_objects()
    noise = LayerAttention("block00", *np.random.default_rng(9).normal(size=(3, 1, HEIGHT, WIDTH, 8)), 0.5)
    layers = [noise, LayerAttention("block01", layer.q, layer.k, layer.v, layer.scale)]
    params = BaselineParams("tokencut", "features", layer="-1", eigenvectors=4)
    arrays, attrs = baseline_image(layers, params)
    direct = run_baseline(layers[1], params)
    assert set(arrays) == {"X", "X_ortho", "eigenvalues", "proposals", "proposal_scores"}
    np.testing.assert_array_equal(arrays["X"].data, direct.x)
    np.testing.assert_array_equal(arrays["X_ortho"].data, direct.x)
    assert arrays["X"].data.shape == (4, HEIGHT, WIDTH) and np.all(np.diff(arrays["eigenvalues"].data) >= 0)
    (mask,) = arrays["proposals"].data
    assert any((mask == (truth == c)).all() for c in (1, 2, 3))  # a planted object, as TokenCut finds it
    np.testing.assert_array_equal(arrays["proposal_scores"].data, [1.0])
    assert attrs == {"layer": "block01", "grid": [HEIGHT, WIDTH], "affinity": "features", "artifact_tokens_dropped": 0,
                     "edges_above_tau": round(direct.edges_above_tau, 4)}
    by_name, _ = baseline_image(layers, BaselineParams("tokencut", "features", layer="block00", eigenvectors=4))
    assert not np.array_equal(by_name["X"].data, arrays["X"].data)  # the other layer
    _, attention = baseline_image(layers, BaselineParams(layer=-1))  # the config may give the index as a number
    assert attention["layer"] == "block01" and "edges_above_tau" not in attention


def lds(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_baseline_round_trip_through_decode_and_evaluate(tmp_path):
    store = ["--store", tmp_path / "store"]
    m = {name: tmp_path / f"{name}.json" for name in ("preprocess", "extract", "baseline", "decode", "evaluate")}
    lds("preprocess", "--dataset", "synthetic-shapes:2", "--size", 96, "--shard-size", 2, *store, "--manifest", m["preprocess"])
    lds("extract", "--input", m["preprocess"], "--model", "tiny-vit", *store, "--manifest", m["extract"])
    lds("baseline", "--input", m["extract"], "--method", "maskcut", "--eigenvectors", 5, *store, "--manifest", m["baseline"])  # attention, layer -2
    lds("decode", "--input", m["baseline"], "--clusters", 3, "--instances", "--coco-results", tmp_path / "instances.json", *store, "--manifest", m["decode"])
    lds("evaluate", "--input", m["decode"], "--metrics", tmp_path / "metrics.json", *store, "--manifest", m["evaluate"])
    import zarr

    baseline = zarr.open_group(json.loads(m["baseline"].read_text())["path"], mode="r")
    decoded = zarr.open_group(json.loads(m["decode"].read_text())["path"], mode="r")
    assert baseline.attrs["pretrained"] is False and baseline.attrs["proposals_from"] == "maskcut"
    item = "shapes-0000"
    assert baseline[f"items/{item}/X"].shape == (5, 6, 6) and baseline[f"items/{item}"].attrs["layer"] == "block02"
    assert baseline[f"items/{item}"].attrs["affinity"] == "attention" and baseline[f"items/{item}"].attrs["artifact_tokens_dropped"] >= 0
    np.testing.assert_array_equal(decoded[f"items/{item}/proposals"][...], baseline[f"items/{item}/proposals"][...])
    assert 1 <= baseline[f"items/{item}/proposals"].shape[0] <= 3
    results = json.loads((tmp_path / "instances.json").read_text())
    assert {round(r["score"], 6) for r in results} <= {1.0, round(2 / 3, 6), round(1 / 3, 6)}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0 <= metrics["mask_ar100"] <= 1 and metrics["proposals_per_image"] <= 3
    flagged = lds("baseline", "--input", m["extract"], "--affinity", "features", "--tau", -1, *store, "--manifest", tmp_path / "every-pair.json")
    assert "warning: in 2 of 2 images the features graph joins 100%" in flagged.output
    refused = CliRunner().invoke(cli, ["baseline", "--input", str(m["extract"]), "--masks", "2", *map(str, store)])
    assert refused.exit_code != 0 and "tokencut makes one mask" in refused.output
