"""`lds evaluate`: the metrics of a dataset x model over all its shards, stored and written as JSON,
and a contact sheet of its images."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.failures import coverage, failed_lineage
from pipeline.store import ArraySpec, Store
from pipeline.store.maintenance import reachable
from stages.common import (
    dask_scheduler_option, log, manifest_option, provenance, read_manifest, run_stage, store_option, upstream,
    write_json_atomic, write_text_atomic,
)
from pipeline.instances import pixel_masks
from stages.decode import model_caption
from stages.zeroshot import zeroshot_confusion

XY_GRID = 32  # X-Y regression on a 32 x 32 lattice (METHOD.md section 6)
CONTACT_SHEET_IMAGES = 16  # images on a contact sheet (the first ones of the dataset)
# what `lds cluster` clustered, by metric prefix: the dataset solver's X_ortho, or per-image solves
SEMANTIC_NAMES = {"semantic": "dataset-level K-Means on X_ortho", "crossimage_kmeans": "K-Means across per-image solves (not the paper's dataset level)"}


def named(values: list[float | None], classes: list[str] | None) -> dict[str, float | None]:
    """Per-class values keyed by class name (by index when the dataset names none)."""
    return {(classes[i] if classes and i < len(classes) else str(i)): v for i, v in enumerate(values)}


def graph_kind(params: dict, stage: str) -> dict[str, str]:
    """The graph kind a run solved on, as metrics.json records it (lds report keys its rows by it):
    lds solve's kq or vv, lds solve-dataset's qk or vv; nothing for a baseline."""
    kind = {"solve": params.get("graphs", {}).get("kind"), "solve-dataset": params.get("graph")}.get(stage)
    return {"graph": kind} if kind else {}


def layer_profile(shards: list) -> dict[str, list]:
    """The agreement of each (layer, head) with the joint eigenvectors and each layer's own X-Y R²,
    averaged over the images, from what lds solve stored per image; empty lists for other runs
    (baselines, the dataset-level solver)."""
    from pipeline.layers import agreement, mean_over_images

    agreements, positions = [], []
    for _, solved, _, items in shards:
        for item in items:
            group = solved[item]
            if "layer_xy_r2" not in group:
                return {"agreement": [], "xy_r2": []}
            agreements.append(agreement(group.attrs["graphs"], group["eigenvalues"][...]))
            positions.append(dict(zip(group.attrs["layers"], group["layer_xy_r2"][...].tolist())))
    return {"agreement": [[layer, head, value] for (layer, head), value in mean_over_images(agreements).items()],
            "xy_r2": [[layer, value] for layer, value in mean_over_images(positions).items()]}


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Decode manifests (one per shard).")
@click.option("--semantic", "semantic_manifest", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Manifest of `lds cluster` (dataset-level clusters) to score as the semantic segmentation.")
@click.option("--zeroshot", "zeroshot_manifests", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifests of `lds zeroshot` (one per shard) to score as named classes, without matching.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write contact-sheet.png here.")
@click.option("--layers-csv", "layers_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the per-layer agreement (diag(Zᵀ A Z) per layer and head) and single-layer X-Y R² as CSV here (runs of lds solve).")
@dask_scheduler_option
@store_option
@manifest_option
def evaluate(input_manifests, semantic_manifest, zeroshot_manifests, metrics_path, figures, layers_path, dask_scheduler, store_root, manifest):
    """X-Y regression of X_ortho; where labels exist, oracle, per-image matched and dataset-level
    semantic mIoU; where objects exist, class-agnostic COCO AP of the proposals mapped back to the
    original images against the dataset's own annotations (read afresh from the dataset files). Each
    image is scored by a dask task reading the store lazily, and the results are summed by a dask
    reduction. Runs of lds solve also get each layer and head's agreement with the joint eigenvectors
    and each layer's own X-Y R², averaged over the images."""
    from pipeline.dask_compute import dask_scheduler as scheduler, tree_reduce
    from pipeline.evaluation import (
        DatasetUnreachable, dataset_records, image_totals, instance_protocol, merge_totals, original_detections,
        original_truth, preprocessed_detections,
    )
    from pipeline.metrics import aligned_scores, coco_evaluate, instance_ground_truth, matched_scores
    from pipeline.preprocess import Geometry

    store = Store(store_root)
    sources = [read_manifest(path, "decode") for path in input_manifests]
    semantic_ref = read_manifest(semantic_manifest, "cluster") if semantic_manifest else None
    semantic = store.open(semantic_ref)["items"] if semantic_ref else None
    # clusters of per-image solves are not the paper's semantic segmentation: their own name (lds cluster)
    prefix = "semantic" if semantic_ref is None or store.attrs(semantic_ref).get("basis") == "dataset" else "crossimage_kmeans"
    shards = [
        (store.open(ref)["items"], store.open(upstream(store, ref, "solve"))["items"],
         store.open(upstream(store, ref, "preprocess"))["items"], store.attrs(ref)["items"])
        for ref in sources
    ]
    classes = store.attrs(upstream(store, sources[0], "preprocess")).get("classes")
    specs = [store.attrs(upstream(store, ref, "preprocess")).get("dataset") for ref in sources]
    zeroshot_refs = [read_manifest(path, "zeroshot") for path in zeroshot_manifests]
    inputs = sources + ([semantic_ref] if semantic_ref else []) + zeroshot_refs
    # images a stage left out (max_failed): not scored, but counted and named in the metrics
    failed = failed_lineage([{"stage": ref.stage, "failed": store.attrs(ref).get("failed", {})} for ref in reachable(store, inputs)])
    shards = [(decoded, solved, images, [item for item in items if item not in failed]) for decoded, solved, images, items in shards]
    results: dict = {}

    def has_objects(decoded, images, item: str) -> bool:
        return "instances" in images[item] and "proposals" in decoded[item]

    def image_task(decoded, solved, images, item: str, record, image_id: int):
        """One image's Totals as a dask.delayed over arrays read lazily from the store. With objects,
        ``record`` (its dataset record) scores them at original size, None at the preprocessed size
        against the stored masks; ``image_id``: its COCO image id."""
        import dask.array as da
        from dask import delayed

        def lazy(group, name: str):
            return da.from_zarr(group[name]) if name in group else None

        regions = decoded[item]["labels"]
        objects = detections = None
        if has_objects(decoded, images, item):
            proposals, scores = lazy(decoded[item], "proposals"), lazy(decoded[item], "proposal_scores")
            if record is not None:
                geometry = Geometry.from_dict(images[item].attrs)
                objects = delayed(original_truth)(record, geometry)
                detections = delayed(original_detections)(proposals, scores, geometry, image_id)
            else:
                objects = delayed(instance_ground_truth)(image_id, lazy(images[item], "instances"), lazy(images[item], "instance_crowd"))
                detections = delayed(preprocessed_detections)(proposals, scores, regions.shape, image_id)
        clusters = None if semantic is None else lazy(semantic[item], "semantic")
        return delayed(image_totals)(
            lazy(solved[item], "X_ortho"), da.from_zarr(regions), XY_GRID, len(classes or ()), lazy(images[item], "labels"),
            clusters, objects, detections,
        )

    # objects are scored against the dataset's own annotations at original size; where the dataset cannot
    # be read any more, against the stored resized masks (a parameter: the two are cached apart)
    wanted: dict[str | None, dict[str, int | None]] = {}  # dataset spec -> item -> image id, of the images with objects
    for spec, (decoded, _, images, items) in zip(specs, shards):
        for item in items:
            if has_objects(decoded, images, item):
                wanted.setdefault(spec, {})[item] = images[item].attrs.get("image_id")
    try:
        records = {item: record for spec, ids in wanted.items() for item, record in dataset_records(spec, ids).items()}
        protocol, instances_at = instance_protocol(list(records.values()), specs[0]), "original"
    except DatasetUnreachable as error:
        records, instances_at = {}, "preprocessed"
        protocol = f"preprocessed resolution, stored resized masks (dataset unreachable: {error})"
        log(f"evaluate: instance metrics at {protocol}")

    def finish(writer):
        tasks, count = [], 0
        for decoded, solved, images, items in shards:
            for item in items:
                record = records.get(item)
                tasks.append(image_task(decoded, solved, images, item, record, record.image_id if record else count))
                count += 1
        totals = tree_reduce(tasks, merge_totals).compute()
        xy, oracle, dataset = totals.xy, totals.oracle, totals.semantic
        per_image = [value for value in totals.matched_miou if value is not None]
        truth_images, truth_objects, detections = totals.truth_images, totals.truth_objects, totals.detections
        arrays = {
            "xy_r2": ArraySpec(np.array([v["r2"] for v in xy]), ("image",), {"description": "X-Y regression R² per image"}),
            "xy_error": ArraySpec(np.array([v["error"] for v in xy]), ("image",), {"description": "X-Y regression mean error per image (fraction of the side)"}),
        }
        results.update({
            "images": len(xy),
            "images_failed": len(failed),
            "failed_images": failed,
            "coverage": coverage(len(xy), len(failed)),
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
            matched = [np.nan if value is None else value for value in totals.matched_miou]
            arrays["matched_miou"] = ArraySpec(np.array(matched), ("image",), {"description": "mIoU per image after Hungarian matching of its own regions (NaN: no labels)"})
        if dataset.size:
            scores = matched_scores(dataset)
            results.update({
                f"{prefix}_clusters": int(dataset.shape[1]),
                f"{prefix}_miou": scores["miou"],
                f"{prefix}_pixel_accuracy": scores["pixel_accuracy"],
                f"{prefix}_iou_per_class": named(scores["iou_per_class"], classes),
            })
            arrays[f"{prefix}_confusion"] = ArraySpec(dataset, ("truth", "cluster"), {"description": f"confusion of the {SEMANTIC_NAMES[prefix]} clusters over the dataset"})
        if truth_images:
            coco = coco_evaluate(truth_images, truth_objects, detections)
            results.update({
                "instance_protocol": protocol,
                "objects": len(truth_objects),
                "proposals_per_image": len(detections) / len(truth_images),
                **{f"{prefix}_{name}": value for kind, prefix in (("bbox", "box"), ("segm", "mask")) for name, value in coco[kind].items()},
            })
        zeroshot = zeroshot_confusion(store, zeroshot_refs, classes) if zeroshot_refs else None
        if zeroshot is not None:
            scores = aligned_scores(zeroshot)
            results.update({
                "zeroshot_miou": scores["miou"],
                "zeroshot_pixel_accuracy": scores["pixel_accuracy"],
                "zeroshot_iou_per_class": named(scores["iou_per_class"], classes),
            })
            arrays["zeroshot_confusion"] = ArraySpec(zeroshot, ("truth", "prediction"), {"description": "confusion of CLIP zero-shot labels over the dataset (last column: names the dataset lacks)"})
        writer.write_root(arrays)
        names = [item for _, _, _, items in shards for item in items]  # the order of the (image,) arrays
        return {"metrics": results, "image_names": names, "layers": layer_profile(shards), "failed": failed}

    model_attrs = provenance(store, sources[0])
    solved_ref = upstream(store, sources[0], "solve")
    # a baseline's run says which (lds report labels its row "model (MaskCut)")
    baseline = {"baseline": store.attrs(solved_ref)["params"]["method"]} if solved_ref.stage == "baseline" else {}
    graph = graph_kind(store.attrs(solved_ref)["params"], solved_ref.stage)
    with scheduler(dask_scheduler):
        ref = run_stage(store, "evaluate", {"xy_grid": XY_GRID, "instances_at": instances_at}, [s.key for s in inputs], inputs, [], lambda item: None, model_attrs, manifest, finish)
    metrics = store.attrs(ref)["metrics"]
    log(f"evaluate: {metrics['coverage']}")
    if metrics_path is not None:
        dataset_spec = store.attrs(upstream(store, sources[0], "preprocess")).get("dataset")
        write_json_atomic(metrics_path, {**model_attrs, **baseline, **graph, **metrics, "dataset_spec": dataset_spec, "artifact": store.path(ref)})
        click.echo(f"metrics: {metrics_path}", err=True)
    profile = store.attrs(ref)["layers"]
    if layers_path is not None and profile["agreement"]:
        from pipeline.layers import layers_csv

        write_text_atomic(layers_path, layers_csv(graph.get("graph", ""), profile))
        click.echo(f"per-layer agreement: {layers_path}", err=True)
    elif layers_path is not None:
        layers_path.unlink(missing_ok=True)  # none for this run: an older run's file must not stand for it
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
        which = SEMANTIC_NAMES[prefix] if semantic is not None else "K-Means per image"
        method = f" | {baseline['baseline']} baseline" if baseline else ""
        save_contact_sheet(figures / "contact-sheet.png", views, f"{model_caption(model_attrs)}{method} | first {len(views)} images", which)
