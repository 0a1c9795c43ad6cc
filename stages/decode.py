"""`lds decode`: K-Means regions from X_ortho, per image, and figures to look at."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.store import ArraySpec, Store
from stages.common import input_option, manifest_option, provenance, read_manifest, run_stage, store_option, upstream


def model_caption(attrs: dict) -> str:
    """'model tiny-vit (random initialisation (NOT pretrained))': said on every figure."""
    return f"model {attrs.get('model', '?')} ({attrs.get('weights', 'unknown weights')})"


@click.command()
@input_option
@click.option("--clusters", type=click.IntRange(2), default=6, show_default=True, help="K of K-Means per image.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write one PNG per image here.")
@store_option
@manifest_option
def decode(input_manifest, clusters, seed, figures, store_root, manifest):
    """Cluster each image's tokens into regions; store token and pixel label maps."""
    from pipeline.decode import kmeans_labels, upsample_labels

    store = Store(store_root)
    source = read_manifest(input_manifest)
    solved = store.open(source)["items"]
    images = store.open(upstream(store, source, "preprocess"))["items"]
    params = {"method": "kmeans", "clusters": clusters, "seed": seed}

    def compute(item: str):
        tokens = kmeans_labels(solved[item]["X_ortho"][...], clusters, seed)
        pixels = upsample_labels(tokens, images[item]["rgb"].shape[:2])
        arrays = {
            "labels_tokens": ArraySpec(tokens, ("y", "x"), {"description": "region per token"}),
            "labels": ArraySpec(pixels, ("y", "x"), {"description": "region per pixel of the preprocessed image"}),
        }
        return arrays, {}, {}

    model_attrs = provenance(store, source)
    items = list(store.attrs(source)["items"])
    ref = run_stage(store, "decode", params, [source.key], [source], items, compute, model_attrs, manifest)
    if figures is not None:
        from pipeline.figures import save_segmentation_figure

        decoded = store.open(ref)["items"]
        for item in items:
            title = f"{item} | {model_caption(model_attrs)} | K-Means K={clusters}"
            save_segmentation_figure(
                figures / f"{item}.png", images[item]["rgb"][...], solved[item]["X_ortho"][...],
                decoded[item]["labels"][...], title,
            )
