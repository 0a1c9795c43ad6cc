"""`lds preprocess`: list a dataset shard, resize its images, store them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from pipeline.data import IGNORE, open_dataset, shard
from pipeline.data.preprocess import PreprocessParams, preprocess_sample
from pipeline.store import Store
from stages.common import manifest_option, run_stage, store_option
from stages.options import click_options, params_from


@click.command()
@click.option("--dataset", required=True, help="skimage-samples, folder:PATH, glob:PATTERN, synthetic-shapes:N, coco:ROOT, coco-stuff27:ROOT, cityscapes27:ROOT or voc2012:ROOT (docs/datasets.md).")
@click.option("--shard", "shard_index", type=click.IntRange(0), default=0, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True, help="Images per shard.")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Only the first N images of the dataset's listing (a fixed subset).")
@click_options(PreprocessParams)
@store_option
@manifest_option
def preprocess(dataset, shard_index, shard_size, max_images, store_root, manifest: Path | None, **settings):
    """Resize one shard of a dataset's images (and label maps and object masks) into the store."""
    params = params_from(PreprocessParams, settings)
    data = open_dataset(dataset)
    records = {r.id: r for r in shard(data.records[:max_images], shard_index, shard_size)}

    def compute(item: str):
        record = records[item]
        arrays, geometry = preprocess_sample(record.load(), params)
        source = str(getattr(record, "path", f"{dataset}#{item}"))
        return arrays, {"source": source, "image_id": record.image_id, **geometry}, {}

    run_stage(
        Store(store_root),
        "preprocess",
        asdict(params),
        input_keys=[f"{item}:{record.content_hash()}" for item, record in records.items()],
        inputs=[],
        items=list(records),
        compute_item=compute,
        attrs={"dataset": dataset, "shard": shard_index, "classes": list(data.classes) if data.classes else None, "ignore_index": IGNORE},
        manifest=manifest,
    )
