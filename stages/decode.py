"""`lds decode`: K-Means regions from X_ortho per image, object proposals, and figures to look at."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
import numpy as np

from pipeline.store import ArraySpec, Store
from stages.common import input_option, manifest_option, provenance, read_manifest, run_stage, store_option, upstream, write_json_atomic


def model_caption(attrs: dict) -> str:
    """'model tiny-vit (random initialisation (NOT pretrained))': said on every figure, with the weights'
    source when the model has one."""
    weights = attrs.get("weights", "unknown weights")
    return f"model {attrs.get('model', '?')} ({weights}{'; ' + attrs['source'] if attrs.get('source') else ''})"


class ClustersType(click.ParamType):
    """K of K-Means: an integer >= 2, or 'auto' (K = 2..10 chosen by silhouette)."""

    name = "K|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        if str(value).isdigit() and int(value) >= 2:
            return int(value)
        self.fail(f"{value!r} is neither an integer >= 2 nor 'auto'", param, ctx)


@click.command()
@input_option
@click.option("--clusters", type=ClustersType(), default=6, show_default=True, help="K of K-Means per image, or 'auto' (2..10 by silhouette).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--instances/--no-instances", default=False, show_default=True, help="Also compute object proposals (METHOD.md section 5); from `lds baseline`, its TokenCut / MaskCut masks.")
@click.option("--extended/--paper-only", default=True, show_default=True, help="With --instances: after the paper's proposals, also rank those its border rule drops and those of K = 11..15 (scored below every other; more recall, same ranking on top).")
@click.option("--coco-results", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the proposals as a COCO results json (original image coordinates, COCO image ids) here.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write one PNG per image here.")
@store_option
@manifest_option
def decode(input_manifest, clusters, seed, instances, extended, coco_results, figures, store_root, manifest):
    """Cluster each image's tokens into regions (and propose objects); store token and pixel maps."""
    from pipeline.decode import kmeans_auto, kmeans_labels, upsample_labels
    from pipeline.instances import ProposalParams, pixel_masks, propose

    if coco_results is not None and not instances:
        raise click.UsageError("--coco-results needs --instances")
    store = Store(store_root)
    source = read_manifest(input_manifest, "solve")
    solved = store.open(source)["items"]
    images = store.open(upstream(store, source, "preprocess"))["items"]
    proposal_params = ProposalParams(seed=seed, extended=extended)
    given = store.attrs(source).get("proposals_from")  # the input made its own proposals (lds baseline)
    proposal_settings = {"from_input": given} if given else asdict(proposal_params)
    params = {"method": "kmeans", "clusters": clusters, "seed": seed, "instances": proposal_settings if instances else None}

    def compute(item: str):
        x_ortho = solved[item]["X_ortho"][...]
        if clusters == "auto":
            tokens, k = kmeans_auto(x_ortho, seed)
        else:
            tokens, k = kmeans_labels(x_ortho, clusters, seed), clusters
        size = images[item]["rgb"].shape[:2]
        arrays = {
            "labels_tokens": ArraySpec(tokens, ("y", "x"), {"description": "region per token"}),
            "labels": ArraySpec(upsample_labels(tokens, size), ("y", "x"), {"description": "region per pixel of the preprocessed image"}),
        }
        if instances:
            if given:
                masks, scores = solved[item]["proposals"][...], solved[item]["proposal_scores"][...]
            else:
                masks, scores = propose(x_ortho, proposal_params)
            chunks = (max(len(masks), 1), *masks.shape[1:])
            scored = f"{given} rank (1, then 1 - i / N)" if given else "balanced silhouette score"
            arrays["proposals"] = ArraySpec(masks, ("proposal", "y", "x"), {"description": "object proposals per token, best first"}, chunks=chunks)
            arrays["proposal_scores"] = ArraySpec(scores, ("proposal",), {"description": f"{scored} per proposal"}, chunks=chunks[:1])
        return arrays, {"clusters": k}, {}

    model_attrs = provenance(store, source)
    items = list(store.attrs(source)["items"])
    ref = run_stage(store, "decode", params, [source.key], [source], items, compute, model_attrs, manifest)
    decoded = store.open(ref)["items"]
    if coco_results is not None:
        write_json_atomic(coco_results, original_coco_results(decoded, images, items))
        click.echo(f"proposals: {coco_results}", err=True)
    if figures is not None:
        from pipeline.figures import ImageView, save_image_figure

        for item in items:
            rgb = images[item]["rgb"][...]
            k = decoded[item].attrs["clusters"]
            proposals = scores = None
            if "proposals" in decoded[item]:
                proposals = pixel_masks(decoded[item]["proposals"][...], rgb.shape[:2])
                scores = decoded[item]["proposal_scores"][...]
            view = ImageView(item, rgb, decoded[item]["labels"][...], proposals, scores)
            title = f"{item} | {model_caption(model_attrs)} | K-Means K={k}{' (auto)' if clusters == 'auto' else ''}"
            save_image_figure(figures / f"{item}.png", view, solved[item]["X"][...], solved[item]["X_ortho"][...], title,
                              first=0 if given else 1)  # a baseline stores no constant eigenvector


def original_coco_results(decoded, images, items: list[str]) -> list[dict]:
    """The stored proposals of ``items`` as COCO results on the original images (COCO image ids), as
    `lds evaluate` scores them."""
    from pipeline.evaluation import original_detections
    from pipeline.preprocess import Geometry

    results = []
    for item in items:
        attrs = images[item].attrs
        results += original_detections(decoded[item]["proposals"][...], decoded[item]["proposal_scores"][...], Geometry.from_dict(attrs), attrs["image_id"])
    return results
