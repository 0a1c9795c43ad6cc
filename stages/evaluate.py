"""`lds evaluate`: the metrics of a dataset x model over all its shards, stored and written as JSON,
and a contact sheet of its images."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.data import IGNORE
from pipeline.store import ArraySpec, Store
from stages.common import (
    manifest_option, provenance, read_manifest, run_stage, store_option, upstream, write_json_atomic,
)
from stages.decode import model_caption, pixel_masks

XY_GRID = 32  # X-Y regression on a 32 x 32 lattice (METHOD.md section 6)
CONTACT_SHEET_IMAGES = 16  # images on a contact sheet (the first ones of the dataset)


def named(values: list[float | None], classes: list[str] | None) -> dict[str, float | None]:
    """Per-class values keyed by class name (by index when the dataset names none)."""
    return {(classes[i] if classes and i < len(classes) else str(i)): v for i, v in enumerate(values)}


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Decode manifests (one per shard).")
@click.option("--semantic", "semantic_manifest", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Manifest of `lds cluster` (dataset-level clusters) to score as the semantic segmentation.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write contact-sheet.png here.")
@store_option
@manifest_option
def evaluate(input_manifests, semantic_manifest, metrics_path, figures, store_root, manifest):
    """X-Y regression of X_ortho; where labels exist, oracle, per-image matched and dataset-level
    semantic mIoU; where objects exist, class-agnostic COCO AP of the proposals."""
    from pipeline.instances import coco_results
    from pipeline.metrics import (
        add_confusion, aligned_scores, coco_evaluate, confusion_matrix, instance_ground_truth, matched_scores,
        oracle_labels, xy_regression,
    )

    store = Store(store_root)
    sources = [read_manifest(path) for path in input_manifests]
    semantic_ref = read_manifest(semantic_manifest) if semantic_manifest else None
    semantic = store.open(semantic_ref)["items"] if semantic_ref else None
    shards = [
        (store.open(ref)["items"], store.open(upstream(store, ref, "solve"))["items"],
         store.open(upstream(store, ref, "preprocess"))["items"], store.attrs(ref)["items"])
        for ref in sources
    ]
    classes = store.attrs(upstream(store, sources[0], "preprocess")).get("classes")
    inputs = sources + ([semantic_ref] if semantic_ref else [])
    results: dict = {}

    def finish(writer):
        xy, per_image, oracle, dataset = [], [], np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
        truth_images, truth_objects, detections = [], [], []
        for decoded, solved, images, items in shards:
            for item in items:
                xy.append(xy_regression(solved[item]["X_ortho"][...], XY_GRID))
                regions = decoded[item]["labels"][...]
                truth = images[item]["labels"][...] if "labels" in images[item] else None
                labelled = None if truth is None else truth[(truth >= 0) & (truth != IGNORE)]
                if labelled is not None and labelled.size:
                    n = max(len(classes or ()), int(labelled.max()) + 1)
                    per_image.append(matched_scores(confusion_matrix(truth, regions, n, int(regions.max()) + 1))["miou"])
                    oracle = add_confusion(oracle, confusion_matrix(truth, oracle_labels(regions, truth), n, n))
                    if semantic is not None:
                        clusters = semantic[item]["semantic"][...]
                        dataset = add_confusion(dataset, confusion_matrix(truth, clusters, n, int(clusters.max()) + 1))
                if "instances" in images[item] and "proposals" in decoded[item]:
                    image_id = len(truth_images)
                    image, annotations = instance_ground_truth(image_id, images[item]["instances"][...], images[item]["instance_crowd"][...])
                    truth_images.append(image)
                    truth_objects += annotations
                    masks = pixel_masks(decoded[item]["proposals"][...], regions.shape)
                    detections += coco_results(masks, decoded[item]["proposal_scores"][...], image_id)
        arrays = {
            "xy_r2": ArraySpec(np.array([v["r2"] for v in xy]), ("image",), {"description": "X-Y regression R² per image"}),
            "xy_error": ArraySpec(np.array([v["error"] for v in xy]), ("image",), {"description": "X-Y regression mean error per image (fraction of the side)"}),
        }
        results.update({
            "images": len(xy),
            "xy_regression_r2": float(np.mean([v["r2"] for v in xy])),
            "xy_regression_error": float(np.mean([v["error"] for v in xy])),
        })
        if per_image:
            scores = aligned_scores(oracle)
            results.update({
                "matched_miou": float(np.mean(per_image)),
                "oracle_miou": scores["miou"],
                "oracle_pixel_accuracy": scores["pixel_accuracy"],
                "oracle_iou_per_class": named(scores["iou_per_class"], classes),
            })
            arrays["oracle_confusion"] = ArraySpec(oracle, ("truth", "prediction"), {"description": "confusion of oracle-decoded regions over the dataset"})
            arrays["matched_miou"] = ArraySpec(np.array(per_image), ("image",), {"description": "mIoU per image after Hungarian matching of its own regions"})
        if dataset.size:
            scores = matched_scores(dataset)
            results.update({
                "semantic_clusters": int(dataset.shape[1]),
                "semantic_miou": scores["miou"],
                "semantic_pixel_accuracy": scores["pixel_accuracy"],
                "semantic_iou_per_class": named(scores["iou_per_class"], classes),
            })
            arrays["semantic_confusion"] = ArraySpec(dataset, ("truth", "cluster"), {"description": "confusion of dataset-level clusters over the dataset"})
        if truth_images:
            coco = coco_evaluate(truth_images, truth_objects, detections)
            results.update({
                "objects": len(truth_objects),
                "proposals_per_image": len(detections) / len(truth_images),
                **{f"{prefix}_{name}": value for kind, prefix in (("bbox", "box"), ("segm", "mask")) for name, value in coco[kind].items()},
            })
        writer.write_root(arrays)
        return {"metrics": results}

    model_attrs = provenance(store, sources[0])
    ref = run_stage(store, "evaluate", {"xy_grid": XY_GRID}, [s.key for s in inputs], inputs, [], lambda item: None, model_attrs, manifest, finish)
    metrics = store.attrs(ref)["metrics"]
    if metrics_path is not None:
        dataset_spec = store.attrs(upstream(store, sources[0], "preprocess")).get("dataset")
        write_json_atomic(metrics_path, {**model_attrs, **metrics, "dataset_spec": dataset_spec, "artifact": str(store.path(ref))})
        click.echo(f"metrics: {metrics_path}", err=True)
    if figures is not None:
        from pipeline.figures import ImageView, save_contact_sheet

        views = []
        for decoded, _, images, items in shards:
            for item in items[: CONTACT_SHEET_IMAGES - len(views)]:
                rgb = images[item]["rgb"][...]
                proposals = scores = None
                if "proposals" in decoded[item]:
                    proposals = pixel_masks(decoded[item]["proposals"][...], rgb.shape[:2])
                    scores = decoded[item]["proposal_scores"][...]
                regions = semantic[item]["semantic"][...] if semantic is not None else decoded[item]["labels"][...]
                views.append(ImageView(item, rgb, regions, proposals, scores))
        which = "dataset-level K-Means" if semantic is not None else "K-Means per image"
        save_contact_sheet(figures / "contact-sheet.png", views, f"{model_caption(model_attrs)} | first {len(views)} images", which)
