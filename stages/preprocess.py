"""`lds preprocess`: list a dataset shard, resize its images, store them."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.data import IGNORE, open_dataset, shard
from pipeline.preprocess import MODES, plan, resize_image, resize_nearest
from pipeline.store import ArraySpec, Store
from stages.common import manifest_option, run_stage, store_option


@click.command()
@click.option("--dataset", required=True, help="skimage-samples, folder:PATH, glob:PATTERN, synthetic-shapes:N, coco:ROOT, coco-stuff27:ROOT, cityscapes27:ROOT or voc2012:ROOT (docs/datasets.md).")
@click.option("--shard", "shard_index", type=click.IntRange(0), default=0, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True, help="Images per shard.")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Only the first N images of the dataset's listing (a fixed subset).")
@click.option("--size", type=click.IntRange(16), default=224, show_default=True, help="Short side in pixels.")
@click.option("--mode", type=click.Choice(MODES), default="short-side", show_default=True)
@click.option("--multiple", type=click.IntRange(1), default=16, show_default=True, help="Crop sides to a multiple (patch size).")
@store_option
@manifest_option
def preprocess(dataset, shard_index, shard_size, max_images, size, mode, multiple, store_root, manifest: Path | None):
    """Resize one shard of a dataset's images (and label maps and object masks) into the store."""
    store = Store(store_root)
    data = open_dataset(dataset)
    records = {r.id: r for r in shard(data.records[:max_images], shard_index, shard_size)}
    params = {"size": size, "mode": mode, "multiple": multiple}

    def compute(item: str):
        record = records[item]
        sample = record.load()
        geometry = plan(sample.rgb.shape[0], sample.rgb.shape[1], size, mode, multiple)
        resized, labels = resize_image(sample.rgb, sample.labels, size, mode, multiple)
        arrays = {"rgb": ArraySpec(resized, ("y", "x", "channel"), {"description": "resized RGB image"})}
        if labels is not None:
            arrays["labels"] = ArraySpec(labels, ("y", "x"), {"description": f"ground-truth class per pixel ({IGNORE} = ignore)"})
        if sample.instances is not None:
            masks = [resize_nearest(mask, geometry) for mask in sample.instances]
            kept = [i for i, mask in enumerate(masks) if mask.any()]  # objects too small to survive resizing
            stacked = np.stack([masks[i] for i in kept]) if kept else np.zeros((0, *geometry.size), dtype=bool)
            arrays["instances"] = ArraySpec(stacked, ("instance", "y", "x"), {"description": "ground-truth object masks (class-agnostic)"}, chunks=(max(len(kept), 1), *geometry.size))
            arrays["instance_crowd"] = ArraySpec(sample.crowd[kept], ("instance",), {"description": "COCO iscrowd flag per object"}, chunks=(max(len(kept), 1),))
        source = str(getattr(record, "path", f"{dataset}#{item}"))
        return arrays, {"source": source, "image_id": record.image_id, **geometry.as_dict()}, {}

    run_stage(
        store,
        "preprocess",
        params,
        input_keys=[f"{item}:{record.content_hash()}" for item, record in records.items()],
        inputs=[],
        items=list(records),
        compute_item=compute,
        attrs={"dataset": dataset, "shard": shard_index, "classes": list(data.classes) if data.classes else None, "ignore_index": IGNORE},
        manifest=manifest,
    )
