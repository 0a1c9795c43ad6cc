"""`lds evaluate`'s work as plain functions over the zarr groups of its input artifacts: one dask task per
image (``image_task``: the per-image metrics of ``image_totals`` on arrays read lazily), their sum
(``evaluate_dataset``), the dataset-level scores (``dataset_metrics``), the instance protocol
(``instance_truth``) and what the stage writes beside the artifact (``metrics_record``, ``layers_text``,
``save_run_contact_sheet``). stages/evaluate.py opens the store and calls them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from pipeline.data import ImageRecord
from pipeline.evaluate.scoring import Totals
from pipeline.failures import coverage
from pipeline.settings import setting
from pipeline.store import ArraySpec

CONTACT_SHEET_IMAGES = 16  # images on a contact sheet (the first ones of the dataset)
# what `lds cluster` clustered, by metric prefix: the dataset solver's X_ortho, or per-image solves
SEMANTIC_NAMES = {"semantic": "dataset-level K-Means on X_ortho", "crossimage_kmeans": "K-Means across per-image solves (not the paper's dataset level)"}


@dataclass(frozen=True)
class EvaluateParams:
    """`lds evaluate`'s parameters, as its artifact records them. No config section and no option: the
    lattice is METHOD.md's (section 6), and where objects are scored follows from whether the dataset
    can still be read (``instance_truth``)."""

    xy_grid: int = setting(32, minimum=2, cli=False, config=False, help="X-Y regression of X_ortho on an N x N lattice (METHOD.md section 6).")
    # not a setting: "preprocessed" when the dataset is unreachable (the two are cached apart)
    instances_at: str = "original"


class Shard(NamedTuple):
    """One decode artifact's images: the ``items`` groups of decode, of the solve (or baseline) it
    decoded and of preprocess, and the items to score."""

    decoded: Any
    solved: Any
    images: Any
    items: list[str]


@dataclass
class EvaluationInputs:
    """What `lds evaluate` scores, opened from the store. ``specs``: per shard, the dataset its preprocess
    artifact read; ``semantic``: the items group of `lds cluster` (None without one), scored under
    ``prefix``; ``failed``: item -> 'stage: reason' of the images the lineage left out (not in ``shards``);
    ``zeroshot``: the zero-shot confusion (called only when the artifact is made)."""

    shards: list[Shard]
    specs: list[str | None]
    classes: list[str] | None = None
    semantic: Any = None
    prefix: str = "semantic"
    failed: dict[str, str] = field(default_factory=dict)
    zeroshot: Callable[[], np.ndarray | None] = lambda: None

    @property
    def image_names(self) -> list[str]:
        """The scored images in order: the order of the artifact's (image,) arrays."""
        return [item for shard in self.shards for item in shard.items]


def cluster_prefix(cluster_attrs: dict | None) -> str:
    """The metric prefix of `lds cluster`'s clusters: clusters of per-image solves are not the paper's
    semantic segmentation and keep their own name."""
    return "semantic" if cluster_attrs is None or cluster_attrs.get("basis") == "dataset" else "crossimage_kmeans"


def without_failed(shards: list[Shard], failed: dict[str, str]) -> list[Shard]:
    """The shards without the images a stage left out (max_failed): counted and named, not scored."""
    return [shard._replace(items=[item for item in shard.items if item not in failed]) for shard in shards]


def named(values: list[float | None], classes: list[str] | None) -> dict[str, float | None]:
    """Per-class values keyed by class name (by index when the dataset names none)."""
    return {(classes[i] if classes and i < len(classes) else str(i)): v for i, v in enumerate(values)}


def graph_kind(params: dict, stage: str) -> dict[str, str]:
    """The graph kind a run solved on, as metrics.json records it (lds report keys its rows by it):
    lds solve's kq or vv, lds solve-dataset's kq or vv; nothing for a baseline."""
    kind = {"solve": params.get("graphs", {}).get("kind"), "solve-dataset": params.get("graph")}.get(stage)
    return {"graph": kind} if kind else {}


def run_facts(solved_stage: str, solved_params: dict) -> dict[str, str]:
    """What metrics.json says of the run beside its model: a baseline's method (lds report labels its row
    "model (MaskCut)") and the graph kind solved on."""
    baseline = {"baseline": solved_params["method"]} if solved_stage == "baseline" else {}
    return {**baseline, **graph_kind(solved_params, solved_stage)}


def layer_profile(shards: list[Shard]) -> dict[str, list]:
    """The agreement of each (layer, head) with the joint eigenvectors and each layer's own X-Y R²,
    averaged over the images, from what lds solve stored per image (neither when the exact solver ran
    without its diagnostics; no X-Y R² when Adam did); empty lists for other runs (baselines, the
    dataset-level solver)."""
    from pipeline.solve.layers import agreement, mean_over_images

    agreements, positions = [], []
    for _, solved, _, items in shards:
        for item in items:
            group = solved[item]
            if "graphs" not in group.attrs or "eigenvalues" not in group:
                return {"agreement": [], "xy_r2": []}
            agreements.append(agreement(group.attrs["graphs"], group["eigenvalues"][...]))
            if "layer_xy_r2" in group:  # lds solve --no-layer-diagnostics leaves it out
                positions.append(dict(zip(group.attrs["layers"], group["layer_xy_r2"][...].tolist())))
    return {"agreement": [[layer, head, value] for (layer, head), value in mean_over_images(agreements).items()],
            "xy_r2": [[layer, value] for layer, value in mean_over_images(positions).items()]}


# ------------------------------------------------------------------------ the instance protocol


def has_objects(decoded_item, images_item) -> bool:
    """Whether an image is scored as objects: its dataset has object masks and decode made proposals."""
    return "instances" in images_item and "proposals" in decoded_item


@dataclass(frozen=True)
class InstanceTruth:
    """Where objects are scored: ``at`` original size against ``records`` (item -> the dataset's record,
    read afresh), or at the preprocessed size against the stored masks when the dataset is unreachable;
    ``protocol`` says which for metrics.json."""

    at: str
    protocol: str
    records: dict[str, ImageRecord] = field(default_factory=dict)


def instance_truth(inputs: EvaluationInputs) -> InstanceTruth:
    """The dataset's own records of the images with objects, or the fallback when it cannot be read."""
    from pipeline.evaluate.scoring import DatasetUnreachable, dataset_records, instance_protocol

    wanted: dict[str | None, dict[str, int | None]] = {}  # dataset spec -> item -> image id
    for spec, shard in zip(inputs.specs, inputs.shards):
        for item in shard.items:
            if has_objects(shard.decoded[item], shard.images[item]):
                wanted.setdefault(spec, {})[item] = shard.images[item].attrs.get("image_id")
    try:
        records = {item: record for spec, ids in wanted.items() for item, record in dataset_records(spec, ids).items()}
    except DatasetUnreachable as error:
        return InstanceTruth("preprocessed", f"preprocessed resolution, stored resized masks (dataset unreachable: {error})")
    return InstanceTruth("original", instance_protocol(list(records.values()), inputs.specs[0]), records)


# ------------------------------------------------------------------------------- per image, in dask


def _lazy(group, name: str):
    import dask.array as da

    return da.from_zarr(group[name]) if name in group else None


def object_tasks(decoded, images, size: tuple[int, int], record: ImageRecord | None, image_id: int) -> tuple:
    """An image's objects and detections as dask.delayed COCO records: at original size against
    ``record`` (its dataset record), or (None) at the preprocessed ``size`` against the stored masks."""
    from dask import delayed

    from pipeline.data.preprocess import Geometry
    from pipeline.evaluate.metrics import instance_ground_truth
    from pipeline.evaluate.scoring import original_detections, original_truth, preprocessed_detections

    proposals, scores = _lazy(decoded, "proposals"), _lazy(decoded, "proposal_scores")
    if record is not None:
        geometry = Geometry.from_dict(images.attrs)
        return delayed(original_truth)(record, geometry), delayed(original_detections)(proposals, scores, geometry, image_id)
    objects = delayed(instance_ground_truth)(image_id, _lazy(images, "instances"), _lazy(images, "instance_crowd"))
    return objects, delayed(preprocessed_detections)(proposals, scores, size, image_id)


def image_task(shard: Shard, item: str, semantic, record: ImageRecord | None, image_id: int, xy_grid: int, classes: int):
    """One image's Totals (``image_totals``) as a dask.delayed over arrays read lazily from the store;
    ``semantic``: the cluster items group or None; ``image_id``: its COCO image id."""
    import dask.array as da
    from dask import delayed

    from pipeline.evaluate.scoring import image_totals

    decoded, solved, images = shard.decoded[item], shard.solved[item], shard.images[item]
    regions = decoded["labels"]
    objects = detections = None
    if has_objects(decoded, images):
        objects, detections = object_tasks(decoded, images, regions.shape, record, image_id)
    clusters = None if semantic is None else _lazy(semantic[item], "semantic")
    return delayed(image_totals)(_lazy(solved, "X_ortho"), da.from_zarr(regions), xy_grid, classes, _lazy(images, "labels"), clusters, objects, detections)


def image_tasks(inputs: EvaluationInputs, truth: InstanceTruth, xy_grid: int) -> list:
    """A task per scored image, in order; an image without a dataset record numbered by its position."""
    tasks = []
    for shard in inputs.shards:
        for item in shard.items:
            record = truth.records.get(item)
            image_id = record.image_id if record else len(tasks)
            tasks.append(image_task(shard, item, inputs.semantic, record, image_id, xy_grid, len(inputs.classes or ())))
    return tasks


# ------------------------------------------------------------------------------- over the dataset

Scores = tuple[dict[str, Any], dict[str, ArraySpec]]  # metrics.json entries and the artifact's root arrays


def position_scores(totals: Totals, failed: dict[str, str]) -> Scores:
    """X-Y regression per image and its mean, and how many images were scored and left out."""
    xy = totals.xy
    results = {
        "images": len(xy),
        "images_failed": len(failed),
        "failed_images": failed,
        "coverage": coverage(len(xy), len(failed)),
        "xy_regression_r2": float(np.mean([v["r2"] for v in xy])),
        "xy_regression_error": float(np.mean([v["error"] for v in xy])),
    }
    arrays = {
        "xy_r2": ArraySpec(np.array([v["r2"] for v in xy]), ("image",), {"description": "X-Y regression R² per image"}),
        "xy_error": ArraySpec(np.array([v["error"] for v in xy]), ("image",), {"description": "X-Y regression mean error per image (fraction of the side)"}),
    }
    return results, arrays


def region_scores(totals: Totals, classes: list[str] | None) -> Scores:
    """Where images have labels: the mean per-image matched mIoU and the oracle decoding's scores."""
    from pipeline.evaluate.metrics import aligned_scores

    per_image = [value for value in totals.matched_miou if value is not None]
    if not per_image:
        return {}, {}
    scores = aligned_scores(totals.oracle)
    results = {
        "matched_miou": float(np.mean(per_image)),
        "oracle_miou": scores["miou"],
        "oracle_pixel_accuracy": scores["pixel_accuracy"],
        "oracle_iou_per_class": named(scores["iou_per_class"], classes),
    }
    matched = [np.nan if value is None else value for value in totals.matched_miou]
    arrays = {
        "oracle_confusion": ArraySpec(totals.oracle, ("truth", "prediction"), {"description": "confusion of oracle-decoded regions over the dataset"}),
        "matched_miou": ArraySpec(np.array(matched), ("image",), {"description": "mIoU per image after Hungarian matching of its own regions (NaN: no labels)"}),
    }
    return results, arrays


def cluster_scores(confusion: np.ndarray, classes: list[str] | None, prefix: str) -> Scores:
    """The clusters of `lds cluster` matched to the classes over the dataset (Hungarian), under ``prefix``."""
    from pipeline.evaluate.metrics import matched_scores

    if not confusion.size:
        return {}, {}
    scores = matched_scores(confusion)
    results = {
        f"{prefix}_clusters": int(confusion.shape[1]),
        f"{prefix}_miou": scores["miou"],
        f"{prefix}_pixel_accuracy": scores["pixel_accuracy"],
        f"{prefix}_iou_per_class": named(scores["iou_per_class"], classes),
    }
    description = f"confusion of the {SEMANTIC_NAMES[prefix]} clusters over the dataset"
    return results, {f"{prefix}_confusion": ArraySpec(confusion, ("truth", "cluster"), {"description": description})}


def object_scores(totals: Totals, protocol: str) -> Scores:
    """Class-agnostic COCO AP, AP50 and AR100 of the proposals, for boxes and masks."""
    from pipeline.evaluate.metrics import coco_evaluate

    if not totals.truth_images:
        return {}, {}
    coco = coco_evaluate(totals.truth_images, totals.truth_objects, totals.detections)
    return {
        "instance_protocol": protocol,
        "objects": len(totals.truth_objects),
        "proposals_per_image": len(totals.detections) / len(totals.truth_images),
        **{f"{prefix}_{name}": value for kind, prefix in (("bbox", "box"), ("segm", "mask")) for name, value in coco[kind].items()},
    }, {}


def zeroshot_scores(confusion: np.ndarray | None, classes: list[str] | None) -> Scores:
    """CLIP zero-shot labels scored as named classes, without matching."""
    from pipeline.evaluate.metrics import aligned_scores

    if confusion is None:
        return {}, {}
    scores = aligned_scores(confusion)
    results = {
        "zeroshot_miou": scores["miou"],
        "zeroshot_pixel_accuracy": scores["pixel_accuracy"],
        "zeroshot_iou_per_class": named(scores["iou_per_class"], classes),
    }
    description = "confusion of CLIP zero-shot labels over the dataset (last column: names the dataset lacks)"
    return results, {"zeroshot_confusion": ArraySpec(confusion, ("truth", "prediction"), {"description": description})}


def dataset_metrics(totals: Totals, inputs: EvaluationInputs, protocol: str) -> Scores:
    """The metrics of the summed images (and of the zero-shot labels), in metrics.json's order."""
    results: dict[str, Any] = {}
    arrays: dict[str, ArraySpec] = {}
    for part_results, part_arrays in (
        position_scores(totals, inputs.failed),
        region_scores(totals, inputs.classes),
        cluster_scores(totals.semantic, inputs.classes, inputs.prefix),
        object_scores(totals, protocol),
        zeroshot_scores(inputs.zeroshot(), inputs.classes),
    ):
        results.update(part_results)
        arrays.update(part_arrays)
    return results, arrays


@dataclass
class Evaluation:
    """What `lds evaluate` publishes: the root ``arrays`` and attributes (``attrs()``)."""

    metrics: dict[str, Any]
    arrays: dict[str, ArraySpec]
    image_names: list[str]
    layers: dict[str, list]
    failed: dict[str, str]

    def attrs(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "image_names": self.image_names, "layers": self.layers, "failed": self.failed}


def evaluate_dataset(inputs: EvaluationInputs, params: EvaluateParams, truth: InstanceTruth) -> Evaluation:
    """The stage's work: every image scored by a dask task (on the current scheduler), the results
    summed by a fixed-order tree reduction, then the dataset's scores and the per-layer profile."""
    from pipeline.dask_compute import tree_reduce
    from pipeline.evaluate.scoring import merge_totals

    totals = tree_reduce(image_tasks(inputs, truth, params.xy_grid), merge_totals).compute()
    metrics, arrays = dataset_metrics(totals, inputs, truth.protocol)
    return Evaluation(metrics, arrays, inputs.image_names, layer_profile(inputs.shards), inputs.failed)


# ---------------------------------------------------------------------- what is written beside it


def metrics_record(model_attrs: dict, facts: dict, metrics: dict, dataset_spec: str | None, artifact: str) -> dict:
    """metrics.json: the model's provenance, the run's facts (``run_facts``), the metrics, the dataset
    and the artifact they are stored in."""
    return {**model_attrs, **facts, **metrics, "dataset_spec": dataset_spec, "artifact": artifact}


def layers_text(facts: dict, profile: dict[str, list]) -> str | None:
    """layers.csv of a run of lds solve; None for other runs (they have no per-layer profile)."""
    from pipeline.solve.layers import layers_csv

    return layers_csv(facts.get("graph", ""), profile) if profile["agreement"] else None


def contact_sheet_views(inputs: EvaluationInputs, limit: int = CONTACT_SHEET_IMAGES) -> list:
    """The first ``limit`` images as the contact sheet shows them: the clusters of `lds cluster` where
    given, else decode's regions per image, and the proposals."""
    from pipeline.decode.instances import pixel_masks
    from pipeline.evaluate.figures import ImageView

    views = []
    for decoded, _, images, items in inputs.shards:
        for item in items[: limit - len(views)]:
            rgb = images[item]["rgb"][...]
            proposals = scores = None
            if "proposals" in decoded[item]:
                proposals = pixel_masks(decoded[item]["proposals"][...], rgb.shape[:2])
                scores = decoded[item]["proposal_scores"][...]
            regions = inputs.semantic[item]["semantic"][...] if inputs.semantic is not None else decoded[item]["labels"][...]
            views.append(ImageView(item, rgb, regions, proposals, scores))
    return views


def save_run_contact_sheet(path, inputs: EvaluationInputs, caption: str, facts: dict) -> None:
    """contact-sheet.png at ``path``, titled with the model's ``caption`` and a baseline's method."""
    from pipeline.evaluate.figures import save_contact_sheet

    views = contact_sheet_views(inputs)
    which = SEMANTIC_NAMES[inputs.prefix] if inputs.semantic is not None else "K-Means per image"
    method = f" | {facts['baseline']} baseline" if "baseline" in facts else ""
    save_contact_sheet(path, views, f"{caption}{method} | first {len(views)} images", which)
