"""`lds evaluate`'s work called directly (pipeline/evaluate/stage.py) on hand-made zarr groups with known
answers: two labelled images -> matched, oracle and dataset-level mIoU, X-Y R², counts, COCO AP and the
zero-shot scores; and the parameters its artifact records (METHOD.md section 6)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import zarr

from pipeline.evaluate.stage import (
    EvaluateParams, EvaluationInputs, InstanceTruth, Shard, cluster_prefix, contact_sheet_views, dataset_metrics,
    evaluate_dataset, image_tasks, instance_truth, layers_text, metrics_record, run_facts, without_failed,
)
from pipeline.evaluate.scoring import Totals
from pipeline.settings import entries

CLASSES = ["sky", "ground"]
LEFT = np.zeros((8, 8), np.int32)
LEFT[:, 4:] = 1  # image a: class 0 on the left, class 1 on the right
TOP = np.zeros((8, 8), np.int32)
TOP[4:] = 1  # image b: class 0 on top, class 1 below
ZEROSHOT = np.array([[3, 1, 0], [0, 2, 2]])  # the last column: names the dataset lacks


def items_group(root, name: str, items: dict[str, dict[str, np.ndarray]], attrs: dict[str, dict] | None = None):
    """A zarr group ``name`` with a sub-group per item holding its arrays, as an artifact's ``items``."""
    group = zarr.open_group(str(root / name), mode="w")
    for item, arrays in items.items():
        sub = group.create_group(item)
        sub.attrs.update((attrs or {}).get(item, {}))
        for array, values in arrays.items():
            sub.create_array(array, data=values)
    return group


def coordinates(height: int = 4, width: int = 4) -> np.ndarray:
    """X_ortho whose components are a constant, y and x: position is read from it exactly (R² = 1)."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    return np.stack([np.ones_like(yy), yy, xx])


def two_images(root, zeroshot: np.ndarray | None = ZEROSHOT) -> EvaluationInputs:
    """Image a: regions the classes up to relabelling, an object (the left half) found by a proposal.
    Image b: one region over both classes, no objects. Dataset-level clusters equal to the truth; a third
    image left out by decode."""
    left_tokens = np.zeros((1, 4, 4), bool)
    left_tokens[0, :, :2] = True
    decoded = items_group(root, "decode", {
        "a": {"labels": np.where(LEFT == 0, 5, 3).astype(np.int32), "proposals": left_tokens, "proposal_scores": np.array([0.9])},
        "b": {"labels": np.zeros((8, 8), np.int32)},
    })
    solved = items_group(root, "solve", {"a": {"X_ortho": coordinates()}, "b": {"X_ortho": coordinates()}})
    images = items_group(root, "preprocess", {
        "a": {"rgb": np.zeros((8, 8, 3), np.uint8), "labels": LEFT, "instances": (LEFT == 0)[None], "instance_crowd": np.array([False])},
        "b": {"rgb": np.zeros((8, 8, 3), np.uint8), "labels": TOP},
    }, {"a": {"image_id": 3}, "b": {"image_id": 4}})
    semantic = items_group(root, "cluster", {"a": {"semantic": LEFT}, "b": {"semantic": TOP}})
    failed = {"c": "decode: broken"}
    shards = without_failed([Shard(decoded, solved, images, ["a", "b", "c"])], failed)
    return EvaluationInputs(shards, [None], CLASSES, semantic, "semantic", failed, lambda: zeroshot)


def test_the_artifact_records_the_lattice_method_prescribes_and_no_option_changes_it():
    assert asdict(EvaluateParams()) == {"xy_grid": 32, "instances_at": "original"}  # METHOD.md section 6: a 32 x 32 grid
    assert [(e.name, e.spec.cli, e.spec.config) for e in entries(EvaluateParams)] == [("xy_grid", False, False)]
    from stages.evaluate import evaluate

    assert [p.name for p in evaluate.params] == [
        "input_manifests", "semantic_manifest", "zeroshot_manifests", "metrics_path", "figures", "layers_path", "dask_scheduler", "store_root", "manifest"]


def test_two_hand_made_images_give_the_hand_computed_metrics(tmp_path):
    inputs = two_images(tmp_path)
    assert inputs.image_names == ["a", "b"]
    truth = instance_truth(inputs)  # the preprocess artifact names no dataset: the stored masks
    assert truth.at == "preprocessed" and truth.protocol.endswith("(dataset unreachable: the preprocess artifact names no dataset)")
    evaluation = evaluate_dataset(inputs, EvaluateParams(instances_at=truth.at), truth)
    metrics = evaluation.metrics
    assert (metrics["images"], metrics["images_failed"], metrics["failed_images"]) == (2, 1, {"c": "decode: broken"})
    assert metrics["coverage"] == "evaluated 2 of 3 images, 1 failed (see summary)"
    assert metrics["xy_regression_r2"] == pytest.approx(1.0) and metrics["xy_regression_error"] == pytest.approx(0.0, abs=1e-6)
    # a: regions are the classes relabelled (mIoU 1); b: one region matched to one of two halves (IoU 1/2 and 0)
    assert metrics["matched_miou"] == pytest.approx((1.0 + 0.25) / 2)
    np.testing.assert_allclose(evaluation.arrays["matched_miou"].data, [1.0, 0.25])
    # oracle: b's one region takes class 0 (a tie goes to the first): confusion [[64, 0], [32, 32]]
    np.testing.assert_array_equal(evaluation.arrays["oracle_confusion"].data, [[64, 0], [32, 32]])
    assert metrics["oracle_iou_per_class"] == pytest.approx({"sky": 64 / 96, "ground": 32 / 64})
    assert metrics["oracle_miou"] == pytest.approx((64 / 96 + 0.5) / 2) and metrics["oracle_pixel_accuracy"] == 0.75
    assert (metrics["semantic_clusters"], metrics["semantic_miou"], metrics["semantic_pixel_accuracy"]) == (2, 1.0, 1.0)
    # the one object found exactly, at the preprocessed size; b has no objects and is not counted
    assert (metrics["objects"], metrics["proposals_per_image"]) == (1, 1.0)
    assert [metrics[f"{kind}_{name}"] for kind in ("box", "mask") for name in ("ap", "ap50", "ar100")] == pytest.approx([1.0] * 6)
    assert metrics["zeroshot_iou_per_class"] == pytest.approx({"sky": 3 / 4, "ground": 2 / 5})
    assert metrics["zeroshot_pixel_accuracy"] == 5 / 8
    assert list(evaluation.arrays) == ["xy_r2", "xy_error", "oracle_confusion", "matched_miou", "semantic_confusion", "zeroshot_confusion"]
    assert evaluation.attrs() == {"metrics": metrics, "image_names": ["a", "b"], "layers": {"agreement": [], "xy_r2": []}, "failed": {"c": "decode: broken"}}


def test_without_labels_objects_or_clusters_only_position_is_scored():
    totals = Totals(xy=[{"r2": 0.5, "error": 0.1}, {"r2": 0.7, "error": 0.3}], matched_miou=[None, None])
    metrics, arrays = dataset_metrics(totals, EvaluationInputs([], [None]), "unused")
    assert metrics == {"images": 2, "images_failed": 0, "failed_images": {}, "coverage": "evaluated 2 of 2 images",
                       "xy_regression_r2": pytest.approx(0.6), "xy_regression_error": pytest.approx(0.2)}
    assert list(arrays) == ["xy_r2", "xy_error"]


def test_per_image_solves_clustered_across_images_keep_their_own_prefix(tmp_path):
    inputs = two_images(tmp_path, zeroshot=None)
    inputs.prefix = cluster_prefix({"basis": "per-image"})
    evaluation = evaluate_dataset(inputs, EvaluateParams(), InstanceTruth("preprocessed", "p"))
    assert evaluation.metrics["crossimage_kmeans_miou"] == 1.0 and evaluation.metrics["crossimage_kmeans_clusters"] == 2
    assert not [key for key in evaluation.metrics if key.startswith(("semantic_", "zeroshot_"))]
    assert "crossimage_kmeans_confusion" in evaluation.arrays and "zeroshot_confusion" not in evaluation.arrays
    assert cluster_prefix(None) == cluster_prefix({"basis": "dataset"}) == "semantic"


def test_images_without_a_dataset_record_are_numbered_by_position(tmp_path):
    inputs = two_images(tmp_path)
    tasks = image_tasks(inputs, InstanceTruth("preprocessed", "p"), xy_grid=8)
    totals = [task.compute() for task in tasks]
    assert [t.truth_images for t in totals] == [[{"id": 0, "height": 8, "width": 8}], []]
    assert [len(t.detections) for t in totals] == [1, 0] and totals[0].detections[0]["image_id"] == 0


def test_what_is_written_beside_the_artifact(tmp_path):
    assert run_facts("baseline", {"method": "maskcut"}) == {"baseline": "maskcut"}
    assert run_facts("solve", {"graphs": {"kind": "vv"}}) == {"graph": "vv"}
    assert run_facts("solve-dataset", {"graph": "kq"}) == {"graph": "kq"}
    record = metrics_record({"model": "m"}, {"graph": "kq"}, {"images": 2}, "synthetic-shapes:2", "store/evaluate/k.zarr")
    assert record == {"model": "m", "graph": "kq", "images": 2, "dataset_spec": "synthetic-shapes:2", "artifact": "store/evaluate/k.zarr"}
    assert layers_text({}, {"agreement": [], "xy_r2": []}) is None
    text = layers_text({"graph": "kq"}, {"agreement": [["block00", 0, 0.5]], "xy_r2": [["block00", 0.25]]})
    assert text.splitlines() == ["graph,layer,head,agreement,layer_xy_r2", "kq,block00,0,0.500000,0.250000"]
    views = contact_sheet_views(two_images(tmp_path), limit=1)
    assert [v.item for v in views] == ["a"] and views[0].proposals.shape == (1, 8, 8)
    np.testing.assert_array_equal(views[0].semantic, LEFT)  # the clusters of lds cluster where given


def test_layer_profile_keeps_the_agreement_of_solves_made_without_layer_diagnostics():
    from pipeline.evaluate.stage import layer_profile

    solved = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    graphs = ["fine/head0", "fine/head1", "coarse/head0"]
    for index, item in enumerate(("a", "b")):
        group = solved.create_group(item)
        group.attrs["graphs"] = graphs
        group.create_array("eigenvalues", data=np.full((3, 2), 0.5 + index / 4))
    profile = layer_profile([(None, solved, None, ["a", "b"])])
    assert profile["xy_r2"] == []
    assert [(layer, head) for layer, head, _ in profile["agreement"]] == [("fine", "head0"), ("fine", "head1"), ("coarse", "head0")]
    np.testing.assert_allclose([value for _, _, value in profile["agreement"]], 0.625)
