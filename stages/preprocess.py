"""`lds preprocess`: list a dataset shard, resize its images, store them."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.data import list_images, shard
from pipeline.preprocess import MODES, resize_image
from pipeline.store import ArraySpec, Store
from stages.common import manifest_option, run_stage, store_option


@click.command()
@click.option("--dataset", required=True, help="skimage-samples, folder:PATH or synthetic-shapes:N.")
@click.option("--shard", "shard_index", type=click.IntRange(0), default=0, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True, help="Images per shard.")
@click.option("--size", type=click.IntRange(16), default=224, show_default=True, help="Short side in pixels.")
@click.option("--mode", type=click.Choice(MODES), default="short-side", show_default=True)
@click.option("--multiple", type=click.IntRange(1), default=16, show_default=True, help="Crop sides to a multiple (patch size).")
@store_option
@manifest_option
def preprocess(dataset, shard_index, shard_size, size, mode, multiple, store_root, manifest: Path | None):
    """Resize one shard of a dataset's images (and label maps) into the store."""
    store = Store(store_root)
    records = {r.id: r for r in shard(list_images(dataset), shard_index, shard_size)}
    params = {"size": size, "mode": mode, "multiple": multiple}

    def compute(item: str):
        record = records[item]
        rgb, labels = record.load()
        resized, resized_labels = resize_image(rgb, labels, size, mode, multiple)
        arrays = {"rgb": ArraySpec(resized, ("y", "x", "channel"), {"description": "resized RGB image"})}
        if resized_labels is not None:
            arrays["labels"] = ArraySpec(resized_labels, ("y", "x"), {"description": "ground-truth labels"})
        source = str(getattr(record, "path", f"{dataset}#{item}"))
        return arrays, {"source": source, "original_size": list(rgb.shape[:2])}, {}

    run_stage(
        store,
        "preprocess",
        params,
        input_keys=[f"{item}:{record.content_hash()}" for item, record in records.items()],
        inputs=[],
        items=list(records),
        compute_item=compute,
        attrs={"dataset": dataset, "shard": shard_index},
        manifest=manifest,
    )
