"""pipeline.evaluate.metrics against hand-computed answers and invariants (METHOD.md sections 5-6)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import IGNORE
from pipeline.decode.instances import coco_results
from pipeline.evaluate.metrics import (
    add_confusion,
    aligned_scores,
    coco_evaluate,
    confusion_matrix,
    hungarian_match,
    instance_ground_truth,
    iou_per_class,
    matched_scores,
    oracle_labels,
    xy_regression,
)

# truth (rows) x predicted cluster (columns). Of the 6 column permutations the best keeps 8 + 5 + 6 = 19
# pixels (cluster 1 -> class 0, cluster 0 -> class 1, cluster 2 -> class 2); the next best keeps 9.
CONFUSION = np.array([[0, 8, 2], [5, 1, 0], [1, 0, 6]])
# after matching, columns are classes: [C[:, 1], C[:, 0], C[:, 2]]
MATCHED = np.array([[8, 0, 2], [1, 5, 0], [0, 1, 6]])
EXPECTED_IOU = [8 / (10 + 9 - 8), 5 / (6 + 6 - 5), 6 / (8 + 7 - 6)]


def labels_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, prediction = [], []
    for t in range(confusion.shape[0]):
        for p in range(confusion.shape[1]):
            truth += [t] * int(confusion[t, p])
            prediction += [p] * int(confusion[t, p])
    order = np.random.default_rng(0).permutation(len(truth))
    return np.array(truth)[order], np.array(prediction)[order]


def test_confusion_matrix_counts_pairs_and_skips_ignored_truth():
    truth, prediction = labels_from_confusion(CONFUSION)
    # ignored pixels (truth -1 or IGNORE) whatever their prediction must not be counted
    truth = np.concatenate([truth, [-1, IGNORE, IGNORE, -1, IGNORE]]).reshape(4, 7)
    prediction = np.concatenate([prediction, [0, 1, 2, 2, 0]]).reshape(4, 7)
    np.testing.assert_array_equal(confusion_matrix(truth, prediction, 3, 3), CONFUSION)


def test_dataset_confusion_is_accumulated_not_averaged_per_image():
    # image A: 90 pixels of class 0 all right; image B: 10 pixels of class 1, all predicted as cluster 0.
    # Over the dataset cluster 0 -> class 0 (90 px): class 0 IoU 90/100, class 1 IoU 0, mIoU 0.45,
    # accuracy 0.9. Averaging the images' own scores would give (1.0 + 1.0) / 2 for mIoU instead.
    a = confusion_matrix(np.zeros(90, int), np.zeros(90, int), 1, 1)
    b = confusion_matrix(np.ones(10, int), np.zeros(10, int), 2, 2)
    total = add_confusion(a, b)
    np.testing.assert_array_equal(total, [[90, 0], [10, 0]])
    scores = matched_scores(total)
    assert scores["iou_per_class"] == pytest.approx([0.9, 0.0])
    assert (scores["miou"], scores["pixel_accuracy"]) == pytest.approx((0.45, 0.9))
    assert matched_scores(a)["miou"] == matched_scores(b)["miou"] == 1.0
    # rectangular parts of any shape add up
    np.testing.assert_array_equal(add_confusion(np.ones((1, 3), int), np.ones((2, 1), int)), [[2, 1, 1], [1, 0, 0]])


def test_hungarian_match_finds_the_unique_optimum():
    np.testing.assert_array_equal(hungarian_match(CONFUSION), [1, 0, 2])


def test_matched_scores_hand_computed():
    scores = matched_scores(CONFUSION)
    assert scores["iou_per_class"] == pytest.approx(EXPECTED_IOU)
    assert scores["miou"] == pytest.approx(np.mean(EXPECTED_IOU))
    assert scores["pixel_accuracy"] == pytest.approx(19 / 23)
    # aligned_scores on the already-matched matrix gives the same
    aligned = aligned_scores(MATCHED)
    assert aligned["iou_per_class"] == pytest.approx(scores["iou_per_class"])
    assert (aligned["miou"], aligned["pixel_accuracy"]) == pytest.approx((scores["miou"], scores["pixel_accuracy"]))


def test_iou_is_nan_for_a_class_absent_from_truth_and_prediction():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    ious = iou_per_class(confusion)
    assert ious[:2] == pytest.approx([3 / 4, 2 / 3])
    assert np.isnan(ious[2])
    assert aligned_scores(confusion)["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert aligned_scores(confusion)["iou_per_class"][2] is None


def test_pixels_of_unmatched_extra_clusters_count_as_errors():
    # 2 classes, 3 clusters: cluster 2 (2 pixels of class 0) is matched to no class. Those pixels are
    # false negatives of class 0, they must not vanish from the evaluation (STEGO counts them too).
    confusion = np.array([[6, 0, 2], [0, 4, 0]])
    scores = matched_scores(confusion)
    assert scores["iou_per_class"] == pytest.approx([6 / 8, 1.0])
    assert scores["miou"] == pytest.approx(0.875)
    assert scores["pixel_accuracy"] == pytest.approx(10 / 12)


def test_classes_absent_from_the_truth_take_no_cluster_and_no_iou():
    # 3 classes, class 2 absent (an image of a 27-class dataset shows few of them). Matching over every
    # row would hand the spare cluster 2 to class 2 and score it 0; the absent class must get no cluster
    # and stay out of the mean, and cluster 2's pixels (class 0) count as errors.
    confusion = np.array([[10, 0, 6], [0, 5, 0], [0, 0, 0]])
    scores = matched_scores(confusion)
    assert scores["iou_per_class"][:2] == pytest.approx([10 / 16, 1.0]) and scores["iou_per_class"][2] is None
    assert scores["miou"] == pytest.approx((10 / 16 + 1.0) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(15 / 21)


def test_fewer_clusters_than_classes_gives_zero_iou_to_unmatched_classes():
    confusion = np.array([[5, 0], [0, 3], [2, 1]])
    scores = matched_scores(confusion)
    assert scores["iou_per_class"] == pytest.approx([5 / 7, 3 / 4, 0.0])
    assert scores["pixel_accuracy"] == pytest.approx(8 / 11)


@pytest.mark.parametrize("clusters", [4, 6])
def test_matched_scores_do_not_depend_on_cluster_ids(clusters):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (20, 30))
    # a noisy prediction correlated with the truth
    prediction = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, clusters, truth.shape))
    permutation = rng.permutation(clusters)
    assert not np.array_equal(permutation, np.arange(clusters))
    base = matched_scores(confusion_matrix(truth, prediction, 4, clusters))
    permuted = matched_scores(confusion_matrix(truth, permutation[prediction], 4, clusters))
    assert permuted == base
    assert 0.3 < base["miou"] < 1.0


def test_perfect_prediction_up_to_relabelling_scores_one():
    truth = np.repeat(np.arange(3), 10).reshape(5, 6)
    scores = matched_scores(confusion_matrix(truth, (truth + 1) % 3, 3, 3))
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0


def test_oracle_labels_takes_the_majority_truth_of_each_region():
    regions = np.array(
        [
            [7, 7, 42, 42],
            [7, 7, 42, 42],
            [3, 3, 3, 9],
            [3, 3, 3, 9],
        ]
    )
    truth = np.array(
        [
            [1, 1, 0, 2],
            [1, 0, 2, 2],
            [-1, IGNORE, -1, -1],  # ignored pixels do not vote
            [0, 0, 5, IGNORE],
        ]
    )
    expected = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 2],
            [0, 0, 0, IGNORE],  # region 9 has no labelled pixel: ignored
            [0, 0, 0, IGNORE],
        ]
    )
    np.testing.assert_array_equal(oracle_labels(regions, truth), expected)


def test_xy_regression_is_perfect_on_features_that_are_the_coordinates():
    height, width = 16, 20
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    noise = np.random.default_rng(0).normal(size=(height, width))
    features = np.stack([3 * yy - 1, -0.5 * xx + 2, noise])
    scores = xy_regression(features)
    assert scores["r2"] == pytest.approx(1.0, abs=1e-9)
    assert scores["error"] == pytest.approx(0.0, abs=1e-9)


def test_xy_regression_is_near_zero_on_noise_and_its_error_is_that_of_guessing_the_mean():
    scores = xy_regression(np.random.default_rng(0).normal(size=(3, 16, 20)))
    assert scores["r2"] < 0.1
    # guessing the centre of a unit square for uniform positions: mean distance about 0.38
    assert 0.3 < scores["error"] < 0.45


def test_xy_regression_is_deterministic_for_a_seed():
    features = np.random.default_rng(3).normal(size=(4, 12, 12))
    assert xy_regression(features, seed=5) == xy_regression(features, seed=5)


# ------------------------------------------------------------------------------- COCOeval, instances

def objects() -> np.ndarray:
    masks = np.zeros((3, 40, 50), dtype=bool)
    masks[0, 5:20, 5:15] = True
    masks[1, 25:35, 20:45] = True
    masks[2, 2:12, 30:48] = True
    return masks


def test_coco_eval_of_perfect_predictions_is_one_and_of_none_is_zero():
    masks = objects()
    image, annotations = instance_ground_truth(7, masks, np.zeros(3, bool))
    perfect = coco_evaluate([image], annotations, coco_results(masks, np.array([0.9, 0.8, 0.7]), 7))
    assert perfect == {kind: {"ap": 1.0, "ap50": 1.0, "ar100": 1.0} for kind in ("bbox", "segm")}
    empty = coco_evaluate([image], annotations, [])
    assert empty == {kind: {"ap": 0.0, "ap50": 0.0, "ar100": 0.0} for kind in ("bbox", "segm")}


def test_coco_eval_of_one_of_two_objects_and_crowd_regions():
    masks = objects()[:2]
    image, annotations = instance_ground_truth(0, masks, np.array([False, False]))
    half = coco_evaluate([image], annotations, coco_results(masks[:1], np.array([0.9]), 0))
    # one of two objects found, first: precision 1 up to recall 0.5 -> AP = 51/101 (COCO's 101 recall points)
    assert half["segm"]["ap"] == pytest.approx(51 / 101) and half["segm"]["ar100"] == pytest.approx(0.5)
    # the same missing object marked as a crowd region is not counted as missed
    image, annotations = instance_ground_truth(0, masks, np.array([False, True]))
    crowd = coco_evaluate([image], annotations, coco_results(masks[:1], np.array([0.9]), 0))
    assert crowd["segm"]["ap"] == pytest.approx(1.0) and crowd["bbox"]["ar100"] == pytest.approx(1.0)
