"""`lds decode`: K-Means regions from X_ortho per image, object proposals, and figures to look at."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.decode.regions import DecodeParams, decode_image, decode_settings, original_coco_results, save_figures
from pipeline.evaluate.figures import model_caption
from pipeline.store import Store
from stages.common import input_option, manifest_option, provenance, read_manifest, run_stage, store_option, upstream, write_json_atomic
from stages.options import click_options, params_from


@click.command()
@input_option
@click_options(DecodeParams)
@click.option("--coco-results", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the proposals as a COCO results json (original image coordinates, COCO image ids) here.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write one PNG per image here.")
@click.option("--max-figures", type=click.IntRange(0), default=None,
              help="With --figures: only the first N images get one (about 0.5 s each; 0: none); default: every image.")
@store_option
@manifest_option
def decode(input_manifest, coco_results, figures, max_figures, store_root, manifest, **settings):
    """Cluster each image's tokens into regions (and propose objects); store token and pixel maps."""
    params = params_from(DecodeParams, settings)
    if coco_results is not None and not params.instances:
        raise click.UsageError("--coco-results needs --instances")
    store = Store(store_root)
    source = read_manifest(input_manifest, "solve")
    solved = store.open(source)["items"]
    images = store.open(upstream(store, source, "preprocess"))["items"]
    given = store.attrs(source).get("proposals_from")  # the input made its own proposals (lds baseline)

    def compute(item: str):
        proposals = (solved[item]["proposals"][...], solved[item]["proposal_scores"][...]) if params.instances and given else None
        return *decode_image(solved[item]["X_ortho"][...], images[item]["rgb"].shape[:2], params, proposals, given), {}

    model_attrs = provenance(store, source)
    items = list(store.attrs(source)["items"])
    ref = run_stage(store, "decode", decode_settings(params, given), [source.key], [source], items, compute, model_attrs, manifest)
    decoded = store.open(ref)["items"]
    if coco_results is not None:
        write_json_atomic(coco_results, original_coco_results(decoded, images, items))
        click.echo(f"proposals: {coco_results}", err=True)
    drawn = items[:max_figures] if max_figures is not None else items
    if figures is not None and drawn:  # a baseline stores no constant eigenvector: its figures start at the first
        save_figures(figures, decoded, images, solved, drawn, model_caption(model_attrs), params.clusters == "auto", first=0 if given else 1)
